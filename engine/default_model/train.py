"""Train the small embedded MoE language model from scratch on plain English text.

The whole pipeline is one command (``moepager train-tiny``): read and clean the corpus, split
off a held-out set by document, train a byte-level BPE tokenizer, train an OLMoE-architecture
model (transformers ``OlmoeForCausalLM``) with the router load-balancing loss, save it in
bfloat16 with its tokenizer and chat template, and evaluate it (held-out perplexity against
a unigram baseline, routing entropy and consecutive-token expert overlap).

The default corpus is the reStructuredText source of the Python 3.11 documentation as shipped
by Debian's ``python3.11-doc`` package (``/usr/share/doc/python3.11/html/_sources``), which is
under the PSF license. Any directory of ``.txt``/``.rst``/``.md`` files, or one text file,
works as well.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
EOS, IM_START, IM_END, PAD = SPECIAL_TOKENS

# ChatML. The model was trained on documentation prose, not on conversations: the template
# exists so the server's chat endpoint has a well-defined prompt format.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_DATA_CANDIDATES = (
    "/usr/share/doc/python3.11/html/_sources",
    "/usr/share/doc/python3/html/_sources",
)
TEXT_SUFFIXES = (".txt", ".rst", ".md")


@dataclass
class TinyConfig:
    """Architecture and optimisation settings; the defaults are the shipped model's."""

    layers: int = 4
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 4
    experts: int = 32
    top_k: int = 4
    expert_intermediate: int = 96
    vocab_size: int = 8192
    context: int = 256
    max_positions: int = 512
    batch_size: int = 8
    steps: int = 450
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    heldout_percent: float = 4.0
    seed: int = 0
    threads: int = 1
    device: str = "cpu"
    experts_implementation: str = "eager"
    eval_windows: int = 64
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# corpus


_ROLE_WITH_TARGET = re.compile(r":[a-zA-Z:+-]+:`([^`<]*?)\s*<[^`>]*>`")
_ROLE = re.compile(r":[a-zA-Z:+-]+:`!?~?([^`]*)`")
_LITERAL = re.compile(r"``([^`]+)``")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_+")
_INTERPRETED = re.compile(r"`([^`]+)`_*")
_STRONG = re.compile(r"\*\*([^*\n]+)\*\*")
_EMPH = re.compile(r"(?<![\w*])\*([^*\s][^*\n]*?)\*(?![\w*])")
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+_.:])\1{2,}\s*$")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_KEEP_ARG_DIRECTIVES = {
    "function", "method", "class", "attribute", "data", "exception", "decorator",
    "classmethod", "staticmethod", "c:function", "c:macro", "c:type", "c:member", "c:var",
    "opcode", "describe", "option", "envvar", "cmdoption", "pdbcommand", "productionlist",
}
_DROP_BLOCK_DIRECTIVES = {
    "index", "toctree", "module", "currentmodule", "highlight", "sectionauthor",
    "moduleauthor", "image", "figure", "raw", "only", "testsetup", "testcleanup",
    "include", "literalinclude", "csv-table", "tabularcolumns", "audit-event", "availability",
    "impl-detail", "c:namespace", "program", "_",
}


def _inline(line: str) -> str:
    line = _ROLE_WITH_TARGET.sub(r"\1", line)
    line = _ROLE.sub(lambda m: m.group(1).lstrip("~!"), line)
    line = _LITERAL.sub(r"\1", line)
    line = _LINK.sub(r"\1", line)
    line = _INTERPRETED.sub(r"\1", line)
    line = _STRONG.sub(r"\1", line)
    line = _EMPH.sub(r"\1", line)
    return line.replace("\\ ", "")


def clean_rst(text: str) -> str:
    """Turn reStructuredText into readable plain text: markup out, prose and code kept."""
    out: list[str] = []
    drop_indent: int | None = None  # inside a dropped directive's body: its indent
    for raw in text.splitlines():
        line = raw.rstrip().replace("\t", "    ")
        indent = len(line) - len(line.lstrip())
        if drop_indent is not None:
            if not line or indent > drop_indent:
                continue
            drop_indent = None
        if _UNDERLINE.match(line):
            continue
        m = _DIRECTIVE.match(line)
        if m:
            name, arg = m.group(2).lower(), m.group(3)
            if name in _KEEP_ARG_DIRECTIVES and arg:
                out.append(" " * indent + _inline(arg))
            elif name in ("versionadded", "versionchanged", "deprecated", "deprecated-removed"):
                label = {"versionadded": "New in version", "versionchanged": "Changed in version",
                         "deprecated": "Deprecated since version",
                         "deprecated-removed": "Deprecated since version"}[name]
                out.append(" " * indent + f"{label} {arg.split()[0] if arg else ''}".rstrip() + ".")
            elif name in _DROP_BLOCK_DIRECTIVES or name.startswith("_"):
                drop_indent = indent
            elif name in ("note", "warning", "seealso", "tip", "important", "caution", "attention"):
                out.append(" " * indent + name.capitalize().replace("Seealso", "See also") + ":"
                           + (" " + _inline(arg) if arg else ""))
            # other directives (code-block, doctest, tables...): keep their body, drop the line
            continue
        stripped = line.lstrip()
        if stripped.startswith(".. "):  # comment or link target
            drop_indent = indent
            continue
        if stripped.startswith(":") and re.match(r"^:[\w -]+:(\s|$)", stripped) and out and \
                out[-1].strip() == "":
            continue  # directive option after a kept header line
        if re.match(r"^:[\w-]+:(\s|$)", stripped) and not out:
            continue  # file-level field list
        if stripped == "::":
            continue
        line = _inline(line)
        if line.endswith("::"):
            line = line[:-1] if not line.endswith(" ::") else line[:-3]
            line = line.rstrip() if line.strip() else ""
        out.append(line)
    cleaned = "\n".join(out)
    cleaned = re.sub(r"\n[ \t]*\n([ \t]*\n)+", "\n\n", cleaned)
    return cleaned.strip() + "\n"


def find_default_data() -> Path:
    for cand in DEFAULT_DATA_CANDIDATES:
        if Path(cand).is_dir():
            return Path(cand)
    raise FileNotFoundError(
        "no --data given and the Python documentation sources are not installed; run "
        "`apt-get download python3.11-doc && dpkg -x python3.11-doc_*.deb /tmp/pydoc` and pass "
        "--data /tmp/pydoc/usr/share/doc/python3.11/html/_sources")


def load_documents(data: str | Path | None) -> list[tuple[str, str]]:
    """Return ``[(name, cleaned_text)]``: one entry per file, or per block of a single file."""
    path = Path(data) if data else find_default_data()
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    docs: list[tuple[str, str]] = []
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"no .txt/.rst/.md files under {path}")
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            is_rst = f.name.endswith((".rst", ".rst.txt"))
            text = clean_rst(text) if is_rst else text.strip() + "\n"
            if len(text) > 200:
                docs.append((str(f.relative_to(path)), text))
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.name.endswith((".rst", ".rst.txt")):
            text = clean_rst(text)
        parts = text.split(EOS) if EOS in text else _blocks(text)
        docs = [(f"{path.name}#{i}", p.strip() + "\n") for i, p in enumerate(parts) if p.strip()]
    return docs


def _blocks(text: str, target: int = 4000) -> list[str]:
    """Group blank-line separated paragraphs into blocks of roughly ``target`` characters."""
    blocks, cur, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        cur.append(para)
        size += len(para)
        if size >= target:
            blocks.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        blocks.append("\n\n".join(cur))
    return blocks


def split_documents(docs: list[tuple[str, str]], heldout_percent: float):
    """Deterministic split by document name (crc32), so it does not depend on the seed."""
    train, held = [], []
    for name, text in docs:
        (held if zlib.crc32(name.encode()) % 10000 < heldout_percent * 100 else train).append(text)
    if not held and len(train) > 1:
        held.append(train.pop())
    if not train:
        train.append(held.pop())
    return train, held


# --------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path, model_max_length: int):
    """Byte-level BPE trained on ``texts``; saved in the Hugging Face format to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=EOS,
        unk_token=None,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def encode_documents(tokenizer, texts: list[str]):
    """All documents as one uint16 stream, each followed by ``<|endoftext|>``."""
    import numpy as np

    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    batch = 64
    backend = tokenizer.backend_tokenizer  # no max-length warnings: documents are long on purpose
    for i in range(0, len(texts), batch):
        for enc in backend.encode_batch(texts[i:i + batch], add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos_id)
    assert max(ids) < 65536
    return np.asarray(ids, dtype=np.uint16)


# --------------------------------------------------------------------------------------------
# model


def build_config(cfg: TinyConfig, tokenizer):
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.expert_intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_positions,
        num_experts=cfg.experts,
        num_experts_per_tok=cfg.top_k,
        norm_topk_prob=True,
        output_router_logits=True,
        router_aux_loss_coef=cfg.aux_loss_coef,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        bos_token_id=None,
        rope_theta=10000.0,
        use_cache=True,
    )


def lr_at(step: int, cfg: TinyConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, progress)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_model(model, tokenizer, out_dir: Path, dtype_name: str = "bfloat16") -> None:
    import copy

    import torch
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    to_save = copy.deepcopy(model).to(device="cpu", dtype=getattr(torch, dtype_name))
    to_save.config.use_cache = True
    to_save.save_pretrained(str(out_dir), safe_serialization=True)
    eos_ids = [tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(IM_END)]
    GenerationConfig(
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        do_sample=False,
        max_new_tokens=64,
    ).save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    finalize_folder(out_dir)


def finalize_folder(out_dir: str | Path) -> None:
    """Make the saved folder self-describing for any loader.

    * ``config.json``: ``output_router_logits`` off, so inference forwards do not compute the
      load-balancing loss (training passes ``output_router_logits=True`` explicitly).
    * ``tokenizer_config.json``: carries the chat template inline (as well as
      ``chat_template.jinja``) and ``model_max_length`` = the model's position limit.
    * ``special_tokens_map.json``: the classic map, for tools that still read it.
    """
    out_dir = Path(out_dir)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["output_router_logits"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tc_path = out_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["chat_template"] = CHAT_TEMPLATE
    tc["model_max_length"] = int(cfg.get("max_position_embeddings", tc.get("model_max_length", 512)))
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": [IM_START, IM_END],
    }, indent=2) + "\n")


def train(cfg: TinyConfig, data: str | None, out: str | Path, *, log=print,
          heldout_out: str | None = None, max_minutes: float | None = None,
          checkpoint_every: int = 0) -> dict:
    """Run the whole pipeline; returns the metrics dict (also written to ``out/metrics.json``)."""
    os.environ.setdefault("RAYON_NUM_THREADS", str(cfg.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false" if cfg.threads == 1 else "true")
    import numpy as np
    import torch

    torch.set_num_threads(cfg.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    docs = load_documents(data)
    train_docs, held_docs = split_documents(docs, cfg.heldout_percent)
    n_train_chars = sum(len(t) for t in train_docs)
    n_held_chars = sum(len(t) for t in held_docs)
    log(f"corpus: {len(docs)} documents, train {len(train_docs)} docs / {n_train_chars / 1e6:.2f} MB, "
        f"held-out {len(held_docs)} docs / {n_held_chars / 1e6:.2f} MB")
    if heldout_out:
        sample = (EOS + "\n").join(held_docs)
        Path(heldout_out).write_text(sample[:190_000], encoding="utf-8")

    tokenizer = train_tokenizer(train_docs, cfg.vocab_size, out, cfg.context)
    train_ids = encode_documents(tokenizer, train_docs)
    held_ids = encode_documents(tokenizer, held_docs)
    log(f"tokenizer: vocab {len(tokenizer)}; train {len(train_ids):,} tokens, held-out {len(held_ids):,} "
        f"tokens ({n_train_chars / max(1, len(train_ids)):.2f} chars/token) [{time.time() - t_start:.0f}s]")

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    mcfg = build_config(cfg, tokenizer)
    mcfg._experts_implementation = cfg.experts_implementation
    from transformers import OlmoeForCausalLM

    model = OlmoeForCausalLM(mcfg)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(cfg.experts_implementation)
    device = torch.device(cfg.device)
    model.to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    log(f"model: OLMoE {cfg.layers} layers, hidden {cfg.hidden}, {cfg.experts} experts top-{cfg.top_k}, "
        f"expert intermediate {cfg.expert_intermediate}; {n_params / 1e6:.2f}M parameters "
        f"({n_expert / 1e6:.2f}M in routed experts)")

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)

    gen = torch.Generator().manual_seed(cfg.seed)
    span = cfg.context + 1
    stream = torch.from_numpy(train_ids.astype(np.int64))
    if len(stream) <= span:
        raise ValueError(f"training data too small: {len(stream)} tokens for context {cfg.context}")
    history: list[dict] = []
    ema = None
    t_train = time.time()
    step = 0
    for step in range(cfg.steps):
        starts = torch.randint(0, len(stream) - span, (cfg.batch_size,), generator=gen)
        batch = torch.stack([stream[s:s + span] for s in starts.tolist()])
        input_ids = batch[:, :-1].to(device)
        labels = batch[:, 1:].to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        out_ = model(input_ids=input_ids, output_router_logits=True)
        logits = out_.logits.float()
        lm_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
        aux = out_.aux_loss if out_.aux_loss is not None else torch.zeros((), device=device)
        loss = lm_loss + cfg.aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        lm = float(lm_loss.detach())
        ema = lm if ema is None else 0.98 * ema + 0.02 * lm
        elapsed = time.time() - t_train
        if step % 10 == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": round(lm, 4), "aux": round(float(aux.detach()), 4)})
        if step % 25 == 0 or step == cfg.steps - 1:
            tps = (step + 1) * cfg.batch_size * cfg.context / max(elapsed, 1e-6)
            log(f"step {step + 1}/{cfg.steps} loss {lm:.4f} (ema {ema:.4f}) aux {float(aux.detach()):.4f} "
                f"lr {lr_at(step, cfg):.2e} gnorm {float(gnorm):.2f} | {tps:,.0f} tok/s, {elapsed / 60:.1f} min",
                )
        if checkpoint_every and step and step % checkpoint_every == 0:
            save_model(model, tokenizer, out)
        if max_minutes is not None and elapsed > max_minutes * 60:
            log(f"stopping at step {step + 1}: time budget of {max_minutes} min reached")
            break
    steps_done = step + 1
    train_seconds = time.time() - t_train
    model.eval()
    save_model(model, tokenizer, out)

    # unigram baseline: training-token frequencies (add-one smoothing) scored on held-out tokens
    counts = np.bincount(train_ids, minlength=len(tokenizer)).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    unigram_ppl = float(np.exp(-logp[held_ids.astype(np.int64)].mean()))

    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    stats = evaluate(saved, held_ids, cfg.context, max_windows=cfg.eval_windows)
    metrics = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
        "data": {"path": str(data or find_default_data()), "documents": len(docs),
                 "train_documents": len(train_docs), "heldout_documents": len(held_docs),
                 "train_chars": n_train_chars, "heldout_chars": n_held_chars,
                 "train_tokens": len(train_ids), "heldout_tokens": len(held_ids)},
        "parameters": n_params,
        "expert_parameters": n_expert,
        "steps": steps_done,
        "train_seconds": round(train_seconds, 1),
        "tokens_seen": steps_done * cfg.batch_size * cfg.context,
        "final_loss_ema": round(ema, 4) if ema is not None else None,
        "final_loss": history[-1]["loss"] if history else None,
        "unigram_ppl": round(unigram_ppl, 2),
        **stats,
        "loss_history": history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    log(f"done: {steps_done} steps in {train_seconds / 60:.1f} min; held-out ppl {stats['heldout_ppl']:.2f} "
        f"(unigram {unigram_ppl:.2f}); routing entropy/layer {stats['routing_entropy_norm']}; "
        f"consecutive overlap {stats['consecutive_overlap']} vs random {stats['random_overlap']:.3f}")
    return metrics


# --------------------------------------------------------------------------------------------
# evaluation


def evaluate(model, token_ids, context: int = 256, max_windows: int = 64, batch_size: int = 8,
             spread: bool = False) -> dict:
    """Held-out perplexity and per-layer routing statistics over non-overlapping windows.

    Windows are the first ``max_windows`` of the stream, or with ``spread`` evenly spaced over it.

    * ``heldout_ppl``: exp of the mean next-token cross-entropy.
    * ``routing_entropy_norm``: entropy of each layer's expert load (how often each expert is in
      a token's top-k), divided by ``log(E)``; 1.0 is perfectly balanced.
    * ``token_router_entropy_norm``: mean entropy of the per-token router softmax / ``log(E)``;
      lower means more confident routing.
    * ``consecutive_overlap``: fraction of a token's top-k experts also chosen by the previous
      token, per layer; ``random_overlap`` = K/E is the value for independent uniform routing.
    """
    import numpy as np
    import torch

    ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
    total = (len(ids) - 1) // context
    n = min(max_windows, total)
    if n < 1:
        raise ValueError(f"need more than {context} tokens to evaluate, got {len(ids)}")
    # window starts: the first n windows, or (spread=True) n windows evenly spaced over the text
    starts = [(i * total // n) * context if spread else i * context for i in range(n)]
    cfg = model.config
    E, K, L = cfg.num_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers
    nll, count = 0.0, 0
    load = torch.zeros(L, E, dtype=torch.float64)
    tok_entropy = torch.zeros(L, dtype=torch.float64)
    overlap = torch.zeros(L, dtype=torch.float64)
    n_tok, n_pairs = 0, 0
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for b in range(0, n, batch_size):
            rows = [ids[s0:s0 + context + 1] for s0 in starts[b:b + batch_size]]
            batch = torch.stack(rows).to(device)
            out = model(input_ids=batch[:, :-1], output_router_logits=True)
            logits = out.logits.float()
            nll += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"))
            count += batch[:, 1:].numel()
            B, T = batch.shape[0], context
            for layer, rl in enumerate(out.router_logits):
                probs = rl.float().softmax(-1).reshape(B, T, E).cpu()
                top = probs.topk(K, dim=-1).indices  # [B, T, K]
                onehot = torch.zeros(B, T, E).scatter_(-1, top, 1.0)
                load[layer] += onehot.sum(dim=(0, 1)).double()
                tok_entropy[layer] += float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).sum())
                overlap[layer] += float((onehot[:, 1:] * onehot[:, :-1]).sum() / K)
            n_tok += B * T
            n_pairs += B * (T - 1)
    p_load = load / load.sum(dim=1, keepdim=True)
    load_entropy = -(p_load * p_load.clamp_min(1e-12).log()).sum(dim=1) / math.log(E)
    return {
        "heldout_ppl": round(math.exp(nll / count), 3),
        "heldout_eval_tokens": count,
        "routing_entropy_norm": [round(float(x), 3) for x in load_entropy],
        "token_router_entropy_norm": [round(float(x) / n_tok / math.log(E), 3) for x in tok_entropy],
        "consecutive_overlap": [round(float(x) / n_pairs, 3) for x in overlap],
        "random_overlap": K / E,
        "max_expert_load_share": [round(float(x), 3) for x in p_load.max(dim=1).values],
    }


def evaluate_dir(model_dir: str | Path, text: str, context: int = 256, max_windows: int = 64) -> dict:
    """Load a saved model folder and evaluate it on ``text``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = encode_documents(tok, [t for t in text.split(EOS) if t.strip()])
    return evaluate(model, ids, context, max_windows)



def model_card(metrics: dict) -> str:
    """MODEL_CARD.md text from the metrics dict that ``train`` returns (and writes)."""
    c, d = metrics["config"], metrics["data"]
    L = c["layers"]
    rows = "\n".join(
        f"| {i} | {metrics['routing_entropy_norm'][i]:.3f} | {metrics['token_router_entropy_norm'][i]:.3f} "
        f"| {metrics['max_expert_load_share'][i]:.3f} | {metrics['consecutive_overlap'][i]:.3f} "
        f"| {metrics['random_overlap']:.3f} |"
        for i in range(L))
    hist = metrics.get("loss_history", [])
    marks = [h for h in hist if h["step"] in (0, 100, 250, 500, 750, 1000) or h is hist[-1]]
    loss_rows = "\n".join(f"| {h['step'] + 1} | {h['loss']:.3f} | {h['aux']:.3f} |" for h in marks)
    return f"""# moepager embedded default model

A small Mixture-of-Experts language model trained from scratch on English technical prose (the
Python documentation). It exists so moepager runs, serves and is tested with no download: it has
real, non-uniform expert routing learned from real text, at a size (about
{metrics['parameters'] / 1e6:.1f}M parameters) that loads in a second on a CPU. It writes
Python-documentation-flavoured English; it is not an assistant and was never trained on dialogue.

## Architecture
transformers `OlmoeForCausalLM` (OLMoE: no shared expert, softmax top-k router).

| | |
|---|---|
| layers | {L} |
| hidden size | {c['hidden']} |
| attention heads (KV heads) | {c['heads']} ({c['kv_heads']}), RoPE |
| routed experts per layer | {c['experts']} |
| experts per token (top-k) | {c['top_k']}, top-k weights renormalised |
| expert intermediate size | {c['expert_intermediate']} (SwiGLU) |
| vocabulary | {c['vocab_size']} byte-level BPE, tied input/output embeddings |
| trained context | {c['context']} tokens (config allows {c['max_positions']}; beyond {c['context']} is untrained) |
| parameters | {metrics['parameters']:,} ({metrics['expert_parameters']:,} in routed experts) |
| weights | bfloat16 safetensors |

`config.json` has `output_router_logits: false` so inference does not compute the
load-balancing loss; training passed `output_router_logits=True` with
`router_aux_loss_coef` {c['aux_loss_coef']}.

Special tokens: `<|endoftext|>` (document separator and EOS), `<|im_start|>`, `<|im_end|>`,
`<|pad|>`. The tokenizer carries a ChatML chat template; `generation_config.json` stops on
`<|endoftext|>` or `<|im_end|>`.

## Data
- Source: the reStructuredText sources of the Python 3.11 documentation
  (`/usr/share/doc/python3.11/html/_sources`) from Debian's `python3.11-doc` package
  (version 3.11.2-6+deb12u9), converted to plain text by `engine.default_model.train.clean_rst`
  (markup roles, directives, index entries and heading underlines removed; prose and code examples
  kept).
- License: per the documentation's own "History and License" page, Python software and
  documentation are licensed under the PSF License Agreement, and code examples in the
  documentation are also under the Zero-Clause BSD license. The PSF license permits derivative
  works such as this model provided the PSF copyright notice is retained:
  "Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved".
- Size: {d['documents']} documents; training split {d['train_documents']} documents,
  {d['train_chars'] / 1e6:.2f} MB of text, {d['train_tokens']:,} tokens; held-out split
  {d['heldout_documents']} documents, {d['heldout_chars'] / 1e6:.2f} MB, {d['heldout_tokens']:,} tokens.
- Split: by document, deterministic (crc32 of the file path, {c['heldout_percent']:g}% held out).
  A sample of the held-out text is at `tests/data/heldout.txt`.

## Training
```
apt-get download python3.11-doc && dpkg -x python3.11-doc_*.deb /tmp/pydoc
moepager train-tiny --data /tmp/pydoc/usr/share/doc/python3.11/html/_sources --out DIR \\
    --steps {c['steps']} --batch-size {c['batch_size']} --seed {c['seed']} --threads {c['threads']}
```
AdamW (betas 0.9/0.95, weight decay {c['weight_decay']}, no decay on norms), peak learning rate
{c['lr']:g}, {c['warmup_steps']} warmup steps then cosine decay to {c['min_lr_ratio']:g}x, gradient clipping
{c['grad_clip']}, batch {c['batch_size']} x {c['context']} tokens, router load-balancing loss coefficient
{c['aux_loss_coef']}, seed {c['seed']}. {metrics['steps']} steps ({metrics['tokens_seen']:,} tokens, about
{metrics['tokens_seen'] / max(1, d['train_tokens']):.2f} epochs) in {metrics['train_seconds'] / 60:.1f} minutes on one CPU thread.

| step | training loss (LM) | load-balancing loss |
|---|---|---|
{loss_rows}

Final training loss (exponential moving average): {metrics['final_loss_ema']:.3f}.

## Evaluation (held-out split: its first {metrics['heldout_eval_tokens'] // c['context']} windows of {c['context']} tokens, {metrics['heldout_eval_tokens']:,} predicted tokens)
| | perplexity |
|---|---|
| this model | **{metrics['heldout_ppl']:.2f}** |
| unigram baseline (training-token frequencies, add-one) | {metrics['unigram_ppl']:.2f} |

Routing per layer, measured on the same held-out windows. Load entropy: entropy of how often
each expert is among a token's top-{c['top_k']}, divided by log {c['experts']} (1 = perfectly balanced).
Token router entropy: mean entropy of a token's router softmax / log {c['experts']} (lower = more
decisive). Max share: the busiest expert's share of the routed assignments (uniform is
{1 / c['experts']:.3f}). Consecutive overlap: fraction of a token's top-{c['top_k']} experts also chosen by the
previous token; independent uniform routing would give K/E = {metrics['random_overlap']:.3f}.

| layer | load entropy | token router entropy | max share | consecutive overlap | random K/E |
|---|---|---|---|---|---|
{rows}

Reproduce with `engine.default_model.train.evaluate_dir(default_model_path(), text)`.

## Limitations
Tiny model, small single-domain corpus, one epoch-scale run on a CPU: text is locally fluent but
often wrong or repetitive. Use it to exercise the serving stack and expert caching, not for answers.
"""
