"""Build the countries knowledge graph and the knowledge-graph QA question set.

Reads (nothing from the network):
  * ``pycountry``   -- ISO 3166 country names, ISO 4217 currency names, ISO 639 language names.
  * ``countryinfo`` -- capitals, currency codes, language codes, land borders (ISO alpha-3),
                       UN M49 region / subregion and alternative spellings of each country.
  Both are dev-time dependencies of this script only; sparkgpt itself never imports them.

Writes:
  * ``sparkgpt/rag/data/countries.jsonl`` -- one triple per line,
    ``{"subject": ..., "relation": ..., "object": ...}``, read as "{subject} {relation} {object}.".
    Relations: "has capital", "uses currency", "has official language", "borders",
    "is in region", "is in subregion", "alias". Sorted by (subject, relation, object).
  * ``sparkgpt/evaluate/tasks/data/kgqa.jsonl`` -- questions over that graph,
    ``{"split", "hops", "question", "answers", "entity"}``: 60 one-hop and 40 two-hop test
    questions, 10 test questions about invented places (``hops: 0``, ``answers: ["unknown"]``)
    and 8 train questions (one-hop and two-hop) for few-shot prompts. The selection is seeded,
    so reruns give the same files; every answer is re-derived from the written graph file and
    asserted before the questions are written. ``entity`` is the graph node the question names:
    the country (one-hop), the capital city, language or currency (two-hop), null (invented places).

Rerun (from the repository root):

    .venv/bin/python tools/make_countries_graph.py

Entities are the 193 UN member states plus the two UN observer states (Holy See, Palestine),
named as people write them: pycountry's ``common_name`` when it has one, else its ``name``,
else (for ISO's inverted forms such as "Congo, The Democratic Republic of the") countryinfo's
name, with a handful of everyday-name overrides (``EVERYDAY_NAMES``). The data oddities this
script repairs or drops are listed next to the tables below.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import pycountry
from countryinfo import CountryInfo

ROOT = Path(__file__).resolve().parent.parent
GRAPH_PATH = ROOT / "sparkgpt" / "rag" / "data" / "countries.jsonl"
QA_PATH = ROOT / "sparkgpt" / "evaluate" / "tasks" / "data" / "kgqa.jsonl"
SEED = 20240611

CAPITAL, CURRENCY, LANGUAGE, BORDERS = "has capital", "uses currency", "has official language", "borders"
REGION, SUBREGION, ALIAS = "is in region", "is in subregion", "alias"
RELATIONS = (CAPITAL, CURRENCY, LANGUAGE, BORDERS, REGION, SUBREGION, ALIAS)

# The 193 UN member states and the 2 observer states (VAT, PSE), as ISO 3166 alpha-3 codes.
_SOVEREIGN_CODES = """
    AFG ALB DZA AND AGO ATG ARG ARM AUS AUT AZE BHS BHR BGD BRB BLR BEL BLZ BEN BTN BOL BIH BWA BRA BRN
    BGR BFA BDI CPV KHM CMR CAN CAF TCD CHL CHN COL COM COG CRI CIV HRV CUB CYP CZE PRK COD DNK DJI DMA
    DOM ECU EGY SLV GNQ ERI EST SWZ ETH FJI FIN FRA GAB GMB GEO DEU GHA GRC GRD GTM GIN GNB GUY HTI HND
    HUN ISL IND IDN IRN IRQ IRL ISR ITA JAM JPN JOR KAZ KEN KIR KWT KGZ LAO LVA LBN LSO LBR LBY LIE LTU
    LUX MDG MWI MYS MDV MLI MLT MHL MRT MUS MEX FSM MCO MNG MNE MAR MOZ MMR NAM NRU NPL NLD NZL NIC NER
    NGA MKD NOR OMN PAK PLW PAN PNG PRY PER PHL POL PRT QAT KOR MDA ROU RUS RWA KNA LCA VCT WSM SMR STP
    SAU SEN SRB SYC SLE SGP SVK SVN SLB SOM ZAF SSD ESP LKA SDN SUR SWE CHE SYR TJK THA TLS TGO TON TTO
    TUN TUR TKM TUV UGA UKR ARE GBR TZA USA URY UZB VUT VEN VNM YEM ZMB ZWE
    VAT PSE
"""
SOVEREIGN = frozenset(_SOVEREIGN_CODES.split())

# Where pycountry's name is not the name people write (pycountry's name becomes an alias).
EVERYDAY_NAMES = {
    "RUS": "Russia",  # "Russian Federation"
    "BRN": "Brunei",  # "Brunei Darussalam"
    "VAT": "Vatican City",  # "Holy See (Vatican City State)"
    "TUR": "Turkey",  # "Türkiye"
    "COG": "Republic of the Congo",  # "Congo", next to "Democratic Republic of the Congo"
}

# countryinfo still lists capitals that have since been renamed.
CAPITAL_FIXES = {("KAZ", "Nur-Sultan"): "Astana"}  # renamed back to Astana in 2022

# countryinfo lists withdrawn ISO 4217 codes; pycountry (current ISO 4217) knows only their successors.
CURRENCY_SUCCESSORS = {
    "BYR": "BYN",  # Belarusian ruble, redenominated 2016
    "MRO": "MRU",  # Mauritanian ouguiya, 2018
    "STD": "STN",  # Sao Tome dobra, 2018
    "VEF": "VES",  # Venezuelan bolivar, 2018
    "ZMK": "ZMW",  # Zambian kwacha, 2013
    "SLL": "SLE",  # Sierra Leonean leone, 2022
    "HRK": "EUR",  # Croatia adopted the euro in 2023
    "BGN": "EUR",  # Bulgaria adopted the euro in 2026 (pycountry already dropped the lev)
}
# Withdrawn without successor (CUC, Cuban convertible peso) or not money people pay with
# (ISO 4217 fund / accounting / next-day codes): dropped.
NOT_CURRENCIES = frozenset({"CUC", "BOV", "CLF", "CHE", "CHW", "COU", "MXV", "USN", "USS", "UYI", "UYW", "XSU", "XUA"})

# countryinfo lists most borders from both sides; these one-sided listings are wrong or only a claim
# (Chad and South Sudan do not touch; Kuwait and Iran share only sea; Serbia reaches Albania only through
# Kosovo, India Afghanistan only through Kashmir; Cyprus "borders" the UK's sovereign base areas).
# The other one-sided listings are real (Nepal-China, Iraq-Kuwait, Palestine-Egypt, Suriname-France via
# French Guiana, ...) and get their missing direction.
NOT_BORDERS = frozenset({("TCD", "SSD"), ("KWT", "IRN"), ("SRB", "ALB"), ("IND", "AFG"), ("CYP", "GBR")})

LANGUAGE_CODE_FIXES = {"rs": "sr"}  # Serbia's language is given as "rs" (its country code), Serbian is "sr"
# ISO 639 names that are not the everyday English name (or that equal a country's name).
LANGUAGE_NAME_FIXES = {
    "Modern Greek (1453-)": "Greek",
    "Tonga (Tonga Islands)": "Tongan",
    "Nauru": "Nauruan",
    "Pushto": "Pashto",
    "Kirghiz": "Kyrgyz",
    "Haitian": "Haitian Creole",
}
# altSpellings that are not names of the country: a transcription, demonym-like words, a common noun.
NOT_ALIASES = frozenset({"ʁɛpublika de an'ɡɔla", "Mexicanos", "Portuguesa", "Prathet", "Island", "Zhonghua"})

# Kept in the graph as countryinfo gives them, but not asked about: the capital is disputed, split
# between several cities, or not what most references give.
CAPITAL_NOT_ASKED = frozenset(
    {"BOL", "ZAF", "CIV", "BEN", "TZA", "LKA", "MYS", "SWZ", "NLD", "ISR", "PSE", "BDI", "NRU", "CHE", "MNE", "YEM"}
)
# countryinfo's language list for these mixes in non-official languages or misses a main official one.
_LANGUAGE_NOT_ASKED = """
    AFG AND ARM AZE CYP TKM UZB TJK LBN ISR COD RWA ZWE BOL PER ARG PHL DZA MAR ETH FJI ERI COM SYC MYS
    BFA GIN CZE BLZ NAM COG BDI GNQ
"""
LANGUAGE_NOT_ASKED = frozenset(_LANGUAGE_NOT_ASKED.split())
# Official in only one country of the graph, but (co-)official elsewhere in reality (Dari is Persian in
# Afghanistan, Somali in Djibouti, Bengali and Nepali in India, Albanian in North Macedonia, ...).
UNIQUE_LANGUAGE_NOT_ASKED = frozenset({"Persian", "Somali", "Bengali", "Nepali", "Albanian", "Malay"})
# Transcontinental countries whose UN M49 region is not the one most people would give.
REGION_NOT_ASKED = frozenset({"TUR", "RUS", "CYP", "ARM", "GEO", "AZE", "KAZ", "EGY"})
CURRENCY_NOT_ASKED = frozenset({"ZWE"})  # countryinfo's US dollar predates Zimbabwe's 2024 ZiG

# Country names written with "the" inside a sentence (besides "United ...", "... Islands", "... Republic").
THE_NAMES = frozenset({"Netherlands", "Bahamas", "Gambia", "Maldives", "Philippines", "Comoros", "Seychelles"})

# Places that exist nowhere; the script asserts no graph string contains them.
INVENTED = {
    "country": ["Veloria", "Zandoria", "Quessland", "Marovania", "Thessalune", "Drovenia"],
    "city": ["Kelmarisk", "Ostravel", "Quoravik", "Brimholt"],
}

ONE_HOP_TEMPLATES = {
    CAPITAL: [
        "What is the capital of {c}?",
        "Which city is the capital of {c}?",
        "What city serves as the capital of {c}?",
        "Name the capital city of {c}.",
    ],
    CURRENCY: [
        "What currency is used in {c}?",
        "Which currency does {c} use?",
        "What is the currency of {c}?",
        "What money do people pay with in {c}?",
    ],
    REGION: ["In which region is {c}?", "Which region of the world is {c} in?", "What region does {c} belong to?"],
    LANGUAGE: [
        "What is an official language of {c}?",
        "Name an official language of {c}.",
        "Which language is an official language of {c}?",
    ],
}
TWO_HOP_TEMPLATES = {
    "capital>currency": [
        "What currency is used in the country whose capital is {x}?",
        "Which currency does the country with the capital {x} use?",
    ],
    "capital>region": [
        "In which region is the country whose capital is {x}?",
        "{x} is the capital of a country in which region?",
    ],
    "capital>language": [
        "What is an official language of the country whose capital is {x}?",
        "Name an official language of the country with the capital {x}.",
    ],
    "language>capital": [
        "What is the capital of the country that has the official language {x}?",
        "Which city is the capital of the country where {x} is an official language?",
    ],
    "currency>capital": [
        "What is the capital of the country that uses the {x}?",
        "Which city is the capital of the country whose currency is the {x}?",
    ],
}
# Each path: the first hop is walked backwards (object -> subject), the second forwards.
PATHS = {
    "capital>currency": (CAPITAL, CURRENCY),
    "capital>region": (CAPITAL, REGION),
    "capital>language": (CAPITAL, LANGUAGE),
    "language>capital": (LANGUAGE, CAPITAL),
    "currency>capital": (CURRENCY, CAPITAL),
}
UNKNOWN_TEMPLATES = [
    ("country", "What is the capital of {x}?"),
    ("country", "What currency is used in {x}?"),
    ("country", "In which region is {x}?"),
    ("country", "What is an official language of {x}?"),
    ("country", "Which city is the capital of {x}?"),
    ("country", "Which currency does {x} use?"),
    ("city", "What currency is used in the country whose capital is {x}?"),
    ("city", "In which region is the country whose capital is {x}?"),
    ("city", "What is an official language of the country whose capital is {x}?"),
    ("city", "Which currency does the country with the capital {x} use?"),
]

CODE_LIKE = re.compile(r"[A-Z]{2,3}")


# --------------------------------------------------------------------------- graph


def _text(value) -> str | None:
    """A clean non-empty string, or None (countryinfo sometimes gives a one-item list)."""
    if isinstance(value, list):
        value = value[0] if value else None
    if not isinstance(value, str):
        return None
    value = " ".join(value.split())
    return value or None


def _filled(record: dict) -> int:
    return sum(1 for v in record.values() if v not in (None, "", [], {}))


def load_countryinfo() -> dict[str, dict]:
    """One countryinfo record per sovereign alpha-3 code.

    countryinfo has two records for some codes (VAT: "Vatican City State" and "Holy See (Vatican
    City State)"; PSE: "Palestine" and "Palestine, State of"; GBR: "United Kingdom" and "Wales";
    MMR: "Myanmar" and "Burma"); the one with the most filled-in fields is kept.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in CountryInfo.all().values():
        code = (record.get("ISO") or {}).get("alpha3")
        if code in SOVEREIGN:
            groups[code].append(record)
    return {code: max(records, key=lambda r: (_filled(r), r["name"])) for code, records in groups.items()}


def country_name(code: str, info: dict) -> str:
    if code in EVERYDAY_NAMES:
        return EVERYDAY_NAMES[code]
    pc = pycountry.countries.get(alpha_3=code)
    name = getattr(pc, "common_name", None) or pc.name
    if "," in name or "(" in name:  # ISO's inverted forms: "Congo, The Democratic Republic of the"
        name = info["name"]
    return name


def currency_names(codes) -> list[str]:
    names = []
    for code in codes or []:
        code = CURRENCY_SUCCESSORS.get(code, code)
        if code in NOT_CURRENCIES:
            continue
        currency = pycountry.currencies.get(alpha_3=code)
        if currency is not None:
            names.append(currency.name)
    return names


def language_names(codes) -> list[str]:
    names = []
    for code in codes or []:
        code = LANGUAGE_CODE_FIXES.get(code, code)
        if len(code) == 2:
            language = pycountry.languages.get(alpha_2=code)
        elif len(code) == 3:
            language = pycountry.languages.get(alpha_3=code)
        else:  # a few records give names instead of codes; none of them is a sovereign country's
            language = None
        if language is None:
            continue
        name = LANGUAGE_NAME_FIXES.get(language.name, language.name)
        names.append(re.sub(r"\s*\(.*\)$", "", name))  # "Malay (macrolanguage)" -> "Malay"
    return names


def border_code(code: str) -> str | None:
    """countryinfo gives borders as alpha-3 codes, and (Vatican City) once as alpha-2."""
    if len(code) == 2:
        pc = pycountry.countries.get(alpha_2=code)
        return pc.alpha_3 if pc else None
    return code


def build_graph() -> tuple[list[dict], dict[str, str], dict]:
    infos = load_countryinfo()
    assert len(SOVEREIGN) == 195
    assert not (SOVEREIGN - infos.keys()), f"countryinfo lacks {sorted(SOVEREIGN - infos.keys())}"
    assert all(pycountry.countries.get(alpha_3=code) for code in SOVEREIGN), "pycountry lacks a sovereign code"
    names = {code: country_name(code, info) for code, info in infos.items()}
    assert len(set(names.values())) == len(names), "two countries share a name"

    triples: set[tuple[str, str, str]] = set()
    notes: dict[str, list] = defaultdict(list)
    alias_owners: dict[str, set[str]] = defaultdict(set)
    alias_text: dict[str, str] = {}
    for code, info in sorted(infos.items()):
        name = names[code]
        capital = _text(info.get("capital"))
        if capital is not None:
            fixed = CAPITAL_FIXES.get((code, capital), capital)
            if fixed != capital:
                notes["capital renamed"].append(f"{name}: {capital} -> {fixed}")
            triples.add((name, CAPITAL, fixed))
        for currency in currency_names(info.get("currencies")):
            triples.add((name, CURRENCY, currency))
        for language in language_names(info.get("languages")):
            triples.add((name, LANGUAGE, language))
        for relation, key in ((REGION, "region"), (SUBREGION, "subregion")):
            value = _text(info.get(key))
            if value is not None:
                triples.add((name, relation, value))
        for raw in info.get("borders") or []:
            other = border_code(raw)
            if (code, other) in NOT_BORDERS or (other, code) in NOT_BORDERS:
                notes["wrong one-sided border dropped"].append(f"{name} -> {names[other]}")
            elif other in names:
                if code not in {border_code(b) for b in infos[other].get("borders") or []}:
                    notes["one-sided border completed"].append(f"{name} -> {names[other]}")
                triples.add((name, BORDERS, names[other]))
                triples.add((names[other], BORDERS, name))
            else:
                notes["border to a non-member dropped"].append(f"{name} -> {raw}")

        pc = pycountry.countries.get(alpha_3=code)
        candidates = [
            info["name"],
            pc.name,
            getattr(pc, "official_name", None),
            *(info.get("altSpellings") or []),
            *(info.get("alt") or []),
        ]
        demonym = _text(info.get("demonym"))
        for raw in candidates:
            alias = _text(raw)
            if alias is None or CODE_LIKE.fullmatch(alias) or "," in alias or alias in NOT_ALIASES:
                continue  # codes ("FR", "FRA") and ISO's inverted forms ("Korea, Republic of")
            alias = re.sub(r"^the ", "", alias)  # pycountry: "the State of Eritrea"
            alias = re.sub(r"\s*\(.*\)$", "", alias)  # "Holy See (Vatican City State)" -> "Holy See"
            if alias.casefold() in (name.casefold(), (demonym or "").casefold()):
                continue
            alias_owners[alias.casefold()].add(name)
            alias_text.setdefault(alias.casefold(), alias)
            triples.add((name, ALIAS, alias))

    # One spelling per region name: countryinfo writes "South-eastern Asia" once as "South-Eastern Asia".
    for relation in (REGION, SUBREGION):
        spellings = Counter(o for _, r, o in triples if r == relation)
        usual = {}
        for spelling, _count in sorted(spellings.items(), key=lambda kv: (-kv[1], kv[0])):
            usual.setdefault(spelling.casefold(), spelling)
        for s, r, o in sorted(triples):
            if r == relation and usual[o.casefold()] != o:
                notes["region spelling unified"].append(f"{s}: {o} -> {usual[o.casefold()]}")
                triples.discard((s, r, o))
                triples.add((s, r, usual[o.casefold()]))

    primary = {n.casefold() for n in names.values()}
    for folded, owners in alias_owners.items():
        if len(owners) > 1 or folded in primary:
            notes["ambiguous alias dropped"].append(f"{alias_text[folded]} ({', '.join(sorted(owners))})")
            triples = {t for t in triples if not (t[1] == ALIAS and t[2].casefold() == folded)}

    rows = [{"subject": s, "relation": r, "object": o} for s, r, o in sorted(triples)]
    return rows, names, notes


# --------------------------------------------------------------------------- graph index


class Graph:
    def __init__(self, rows: list[dict]):
        self.out: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.inv: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.strings: set[str] = set()
        for row in rows:
            s, r, o = row["subject"], row["relation"], row["object"]
            self.out[(s, r)].add(o)
            self.inv[(r, o)].add(s)
            self.strings.update((s, o))

    def objects(self, subject: str, relation: str) -> set[str]:
        return set(self.out.get((subject, relation), ()))

    def subjects(self, relation: str, obj: str) -> set[str]:
        return set(self.inv.get((relation, obj), ()))

    def answer(self, item: dict) -> list[str]:
        """Re-derive an item's answers by walking the graph along its (private) path."""
        if item["hops"] == 0:
            return ["unknown"]
        start, path = item["_start"], item["_path"]
        if item["hops"] == 1:
            return sorted(self.objects(start, path[0]))
        countries = self.subjects(path[0], start)
        assert len(countries) == 1, f"{item['question']!r}: the first hop is ambiguous ({sorted(countries)})"
        return sorted(self.objects(countries.pop(), path[1]))


# --------------------------------------------------------------------------- questions


def with_article(country: str) -> str:
    """The country's name as it reads inside a sentence: "the Netherlands", "the United States"."""
    if country in THE_NAMES or country.startswith(("United ", "Republic ", "Democratic ", "Federated ")):
        return "the " + country
    return "the " + country if country.endswith(("Islands", " Republic")) else country


def build_questions(graph: Graph, names: dict[str, str]) -> list[dict]:
    rng = random.Random(SEED)
    countries = sorted(names.values())
    code_of = {v: k for k, v in names.items()}

    def one_ok(country: str, relation: str) -> bool:
        code, answers = code_of[country], graph.objects(country, relation)
        if relation == CAPITAL:
            return len(answers) == 1 and code not in CAPITAL_NOT_ASKED and answers != {country}
        if relation == CURRENCY:
            return len(answers) == 1 and code not in CURRENCY_NOT_ASKED
        if relation == REGION:
            return len(answers) == 1 and code not in REGION_NOT_ASKED
        return len(answers) >= 1 and code not in LANGUAGE_NOT_ASKED

    def unique_capital(country: str) -> str | None:
        """The country's capital, if askable and naming only this country."""
        if not one_ok(country, CAPITAL):
            return None
        (capital,) = graph.objects(country, CAPITAL)
        if country.casefold() in capital.casefold():  # "Kuwait City" would give the country away
            return None
        return capital if graph.subjects(CAPITAL, capital) == {country} else None

    # Two-hop starting points: (start string, country it leads to) per path.
    starts: dict[str, list[tuple[str, str]]] = {}
    for path, (first, second) in PATHS.items():
        pool = []
        if first == CAPITAL:
            for c in countries:
                capital = unique_capital(c)
                if capital and one_ok(c, second):
                    pool.append((capital, c))
        else:  # a language or currency that only one country has
            values = sorted({o for c in countries for o in graph.objects(c, first)})
            for value in values:
                owners = graph.subjects(first, value)
                if len(owners) != 1:
                    continue
                (c,) = owners
                if first == LANGUAGE:
                    ok_first = code_of[c] not in LANGUAGE_NOT_ASKED and value not in UNIQUE_LANGUAGE_NOT_ASKED
                else:
                    ok_first = code_of[c] not in CURRENCY_NOT_ASKED
                if ok_first and unique_capital(c) and value.casefold() != c.casefold():
                    pool.append((value, c))
        starts[path] = pool

    used: set[str] = set()  # countries already asked about, so test and train never share one
    items: list[dict] = []

    def take(pool: list, k: int, key) -> list:
        chosen = []
        for candidate in rng.sample(pool, len(pool)):
            if len(chosen) == k:
                break
            if key(candidate) not in used:
                used.add(key(candidate))
                chosen.append(candidate)
        assert len(chosen) == k, f"only {len(chosen)} of {k} candidates"
        return chosen

    def one_hop(split: str, relation: str, k: int, phrasing: int) -> None:
        pool = [c for c in countries if one_ok(c, relation)]
        for i, c in enumerate(take(pool, k, key=lambda c: c)):
            templates = ONE_HOP_TEMPLATES[relation]
            question = templates[(phrasing + i) % len(templates)].format(c=with_article(c))
            items.append(
                {"split": split, "hops": 1, "question": question, "entity": c, "_start": c, "_path": (relation,)}
            )

    def two_hop(split: str, path: str, k: int, phrasing: int) -> None:
        for i, (start, _country) in enumerate(take(starts[path], k, key=lambda sc: sc[1])):
            templates = TWO_HOP_TEMPLATES[path]
            question = templates[(phrasing + i) % len(templates)].format(x=start)
            items.append(
                {
                    "split": split,
                    "hops": 2,
                    "question": question,
                    "entity": start,
                    "_start": start,
                    "_path": PATHS[path],
                }
            )

    # Few-shot examples first, so their countries are kept out of the test split.
    for relation in (CAPITAL, CURRENCY, REGION, LANGUAGE):
        one_hop("train", relation, 1, phrasing=0)
    for path in ("capital>currency", "capital>region", "language>capital", "currency>capital"):
        two_hop("train", path, 1, phrasing=0)
    # The first hop of two-hop questions names a country's capital, language or currency, so two-hop
    # questions take their countries first (their pools are smaller), one-hop questions the rest.
    for path, k in (
        ("language>capital", 8),
        ("currency>capital", 8),
        ("capital>currency", 10),
        ("capital>region", 8),
        ("capital>language", 6),
    ):
        two_hop("test", path, k, phrasing=1)
    for relation in (CAPITAL, CURRENCY, REGION, LANGUAGE):
        one_hop("test", relation, 15, phrasing=1)

    fakes = {kind: iter(places) for kind, places in INVENTED.items()}
    for kind, template in UNKNOWN_TEMPLATES:
        x = next(fakes[kind])
        items.append(
            {"split": "test", "hops": 0, "question": template.format(x=x), "entity": None, "_start": x, "_path": ()}
        )
    return items


# --------------------------------------------------------------------------- main


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    rows, names, notes = build_graph()
    write_jsonl(GRAPH_PATH, rows)

    # Everything below reads the graph back from the file just written.
    with GRAPH_PATH.open(encoding="utf-8") as f:
        graph = Graph([json.loads(line) for line in f])
    items = build_questions(graph, names)

    lowered = {s.casefold() for s in graph.strings}
    for item in items:
        item["answers"] = graph.answer(item)
        assert item["answers"], f"no answer for {item['question']!r}"
        if item["hops"] == 0:
            start = item["_start"].casefold()
            assert not any(start in s for s in lowered), f"{item['_start']} is in the graph"
    questions = [item["question"] for item in items]
    assert len(set(questions)) == len(questions), "duplicate question"

    order = ("split", "hops", "question", "answers", "entity")
    items.sort(key=lambda it: (it["split"] != "train", {1: 0, 2: 1, 0: 2}[it["hops"]]))  # stable sort
    out = [{key: item[key] for key in order} for item in items]
    write_jsonl(QA_PATH, out)

    # Re-read the written questions and check each one against the written graph once more.
    with QA_PATH.open(encoding="utf-8") as f:
        written = [json.loads(line) for line in f]
    for row, item in zip(written, items, strict=True):
        assert row["answers"] == graph.answer(item), row

    per_relation = Counter(row["relation"] for row in rows)
    print(f"{GRAPH_PATH.relative_to(ROOT)}: {len(names)} countries, {len(rows)} triples")
    for relation in RELATIONS:
        print(f"  {relation:<22} {per_relation[relation]}")
    kinds = Counter((row["split"], row["hops"]) for row in written)
    print(f"{QA_PATH.relative_to(ROOT)}: {len(written)} questions")
    for (split, hops), n in sorted(kinds.items()):
        print(f"  {split:<5} hops={hops}  {n}")
    for note, examples in sorted(notes.items()):
        print(f"note: {note}: {len(examples)} ({'; '.join(examples[:6])}{' ...' if len(examples) > 6 else ''})")


if __name__ == "__main__":
    main()
