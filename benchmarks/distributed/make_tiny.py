"""A tiny random Llama, its tokenizer and two small data files in DIR (for gpu_check.sh)."""
import json, sys
from pathlib import Path
from tests.conftest import make_chat_tokenizer, make_tiny_model
t = Path(sys.argv[1]); t.mkdir(parents=True, exist_ok=True)
tok = make_chat_tokenizer()
make_tiny_model("llama", vocab_size=len(tok), layers=4).save_pretrained(t / "tiny"); tok.save_pretrained(t / "tiny")
with open(t / "h.jsonl", "w") as f:
    for i in range(8):
        f.write(json.dumps({"prompt": f"How do I bake bread {i}?", "output": "Sure, here is a simple recipe for bread. " * (1 + i % 3)}) + "\n")
with open(t / "b.jsonl", "w") as f:
    for i in range(8):
        f.write(json.dumps({"request": f"Explain the water cycle {i}" + " briefly" * (i % 3), "response": "Water evaporates."}) + "\n")
