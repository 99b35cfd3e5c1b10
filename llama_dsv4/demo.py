"""The embedded demo model: a small deepseek4 network trained on a 2-core CPU by the recipe in `train/` (see
docs/demo-model.md), shipped inside the package as a Q8xQ5 GGUF, so the CLI's main job and the examples run on a
fresh machine with no download. It has its own 2,048-token vocabulary (DeepSeek V4's pre-tokenizer and special
tokens) and DeepSeek V4's chat template; it knows the chat markup, worked arithmetic, two demo tools
(`get_weather`, `convert_currency`) and JSON answers, and writes poor English."""

from __future__ import annotations

import os

DEMO_FILE = "demo-q8xq5.gguf"
DEMO_NAME_PREFIX = "llama-dsv4 demo:"  # the start of the file's general.name
#: what the main job asks the demo model when no prompt is given (problems held out of its training data)
DEMO_QUESTIONS = ("What is 337 + 836?", "What is 641 - 216?")
#: the two tools the demo model was trained to call, as OpenAI tool definitions
DEMO_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city name"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "convert_currency",
            "description": "Convert an amount of money from one currency to another.",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number", "description": "The amount to convert"},
                    "from": {"type": "string", "description": "Currency code to convert from, e.g. USD"},
                    "to": {"type": "string", "description": "Currency code to convert to, e.g. EUR"},
                },
                "required": ["amount", "from", "to"],
            },
        },
    },
]


def demo_model_path() -> str:
    """Path of the demo model shipped in the package (FileNotFoundError, naming the path, if the install lacks it)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", DEMO_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"the embedded demo model {path} is missing from this install: reinstall llama-dsv4")
    return path


if __name__ == "__main__":  # `python -m llama_dsv4.demo` prints the path, e.g. for llama-dsv4-server -m
    print(demo_model_path())
