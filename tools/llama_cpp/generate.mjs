// Greedy completions from a GGUF file by llama.cpp (node-llama-cpp's prebuilt CPU build; never a source build).
// Usage: node generate.mjs MODEL.gguf MAX_TOKENS PROMPT...   Prints a JSON list of the completions.
import {getLlama, LlamaCompletion} from "node-llama-cpp";

const [modelPath, maxTokens, ...prompts] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath});
const texts = [];
for (const prompt of prompts) {
    const context = await model.createContext({contextSize: 512, threads: 2});
    const completion = new LlamaCompletion({contextSequence: context.getSequence()});
    texts.push(await completion.generateCompletion(prompt, {maxTokens: Number(maxTokens), temperature: 0}));
    await context.dispose();
}
console.log(JSON.stringify(texts));
