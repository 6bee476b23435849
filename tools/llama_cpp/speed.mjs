// llama.cpp's prefill and decode speed on a GGUF file, measured as benchmarks/bench_generate.py measures ours.
// Usage: node speed.mjs MODEL.gguf THREADS REPEATS '{"long": [ids...], "short": [ids...], "new_tokens": 128}'
// Prefill: time to the first new token after the long prompt. Decode: new tokens per second after the short
// prompt (the time of the tokens after the first). Greedy; best of REPEATS. Prints one JSON object.
import {getLlama} from "node-llama-cpp";

const [modelPath, threads, repeats, spec] = process.argv.slice(2);
const {long, short, new_tokens: newTokens} = JSON.parse(spec);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: 1024, batchSize: 512, threads: Number(threads)});
const sequence = context.getSequence();

async function run(prompt, count) {
    await sequence.clearHistory();
    const tokens = sequence.evaluate(prompt, {temperature: 0});
    const start = performance.now();
    await tokens.next();
    const first = performance.now();
    for (let i = 1; i < count; i++) await tokens.next();
    const end = performance.now();
    await tokens.return();
    return {first: (first - start) / 1000, rest: (end - first) / 1000};
}

let prefill = Infinity, decode = Infinity;
await run(short, 2);  // warm-up
for (let r = 0; r < Number(repeats); r++) {
    prefill = Math.min(prefill, (await run(long, 1)).first);
    decode = Math.min(decode, (await run(short, newTokens + 1)).rest);
}
console.log(JSON.stringify({prefill_tok_s: long.length / prefill, decode_tok_s: newTokens / decode}));
