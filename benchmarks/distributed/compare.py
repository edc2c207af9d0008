"""Compare two runs' OUT/adapter weights and train logs (for gpu_check.sh): compare.py RUN REFERENCE LABEL."""
import sys, json
from safetensors.torch import load_file
a, b = load_file(sys.argv[1] + "/adapter/adapter_model.safetensors"), load_file(sys.argv[2] + "/adapter/adapter_model.safetensors")
assert a.keys() == b.keys()
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
scale = max(b[k].float().abs().max().item() for k in b)
steps = lambda d: [json.loads(l)["step"] for l in open(d + "/train_log.jsonl")]
print(f"{sys.argv[3]}: max abs diff {diff:.3g} (max |w| {scale:.3g}); steps {steps(sys.argv[1])} vs {steps(sys.argv[2])}; dtype {next(iter(a.values())).dtype}")
