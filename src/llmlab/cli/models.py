"""Verbs on a model: attention, embed, info, export, generate, perplexity."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from llmlab.cli.common import _parse_head, console, verb
from llmlab.data import load_corpus
from llmlab.errors import LlmlabError
from llmlab.evaluate import perplexity
from llmlab.generate.causal import GenerationConfig, generate_text
from llmlab.generate.chat import generate_from_ids, prompt_ids
from llmlab.generate.seq2seq import generate_seq2seq, greedy_target
from llmlab.inspect import lens, viz
from llmlab.inspect.lens import cross_attention_rows
from llmlab.interop import export, load


def cli_generate(model: torch.nn.Module, a: Any) -> int:
    """`llmlab generate` on a seq2seq run: each --prompt is a source; greedy, sampling or --beams N."""
    if not a.prompt:
        raise LlmlabError("give the source text with --prompt (repeat for several)")
    if any(not p.strip() for p in a.prompt):
        raise LlmlabError("a --prompt is empty; give the source text to transform")
    cfg = GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=0.0 if a.greedy else a.temperature,
                           top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty, seed=a.seed,
                           use_cache=not a.no_cache)
    outs = generate_seq2seq(model, a.prompt, cfg, beams=a.beams, alpha=a.length_penalty)
    for s in a.stop:
        outs = [o.split(s, 1)[0] if s else o for o in outs]
    if a.json:
        print(json.dumps([{"prompt": p, "completion": o} for p, o in zip(a.prompt, outs)]))
    else:
        for p, o in zip(a.prompt, outs):
            print(f"--- {p!r}\n{o}")
    return 0




def _attention_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sentence", help="the text to look at")
    p.add_argument("--model", default="minilm", help="minilm (default), an llmlab run folder or a Hugging Face folder")
    p.add_argument("--query", help="the word whose attention to show (e.g. woke)")
    p.add_argument("--key", help="rank the heads by how much the query attends to this word (e.g. cat)")
    p.add_argument("--head", help="LAYER.HEAD to draw large (default: the best head for --key)")
    p.add_argument("--no-special", action="store_true", help="leave out [CLS], [SEP] and other special tokens")
    p.add_argument("--top", type=int, default=5, help="how many keys / heads to list (default 5)")
    p.add_argument("--target", help="seq2seq models: the target text whose cross-attention to show")
    p.add_argument("--out", default="runs/attention", help="folder for the PNG files (default runs/attention)")
    p.add_argument("--json", action="store_true", help='print {"tokens": [...], "weights": [layer][head][q][k]}')


@verb("attention", "show which tokens a word attends to, in every layer and head", _attention_args)
def cmd_attention(a: argparse.Namespace) -> int:

    model = load(a.model)
    target = a.target
    if model.config.arch == "seq2seq" and target is None:  # show the cross-attention of the model's own output

        target = greedy_target(model, a.sentence)
        console(stderr=True).print(f"target (the model's greedy output): {target!r}", markup=False)
    maps = lens.compute_attention(model, a.sentence, target=target)
    if a.json:
        print(json.dumps(maps.to_json()))
        return 0
    out = Path(a.out)
    c = console()
    c.print(f"[bold]{maps.n_layers} layers x {maps.n_heads} heads[/] over {len(maps.tokens)} tokens: "
            + " ".join(maps.tokens))
    head = _parse_head(a.head, maps) if a.head else None
    if a.query:
        q = a.query
        rows = lens.top_keys(maps, q, k=a.top, skip_special=a.no_special)
        c.print(f"\n[bold]'{q}' attends most to[/] (mean over every layer and head"
                + (", special tokens left out and the rest renormalised to sum to 1" if a.no_special
                   else ", special tokens included") + "):")
        for _, t, w in rows:
            c.print(f"  {t:>14s}  {w:.3f}  {'#' * int(round(w * 40))}")
        c.print(f"\n[bold]per head[/] (top {min(3, a.top)} keys):")
        for layer in range(maps.n_layers):
            for h in range(maps.n_heads):
                best = lens.top_keys(maps, q, k=min(3, a.top), skip_special=a.no_special, layer=layer, head=h)
                c.print(f"  L{layer}.H{h:<2d} " + "  ".join(f"{t}:{w:.2f}" for _, t, w in best))
        if a.key:
            ranked = lens.rank_heads(maps, q, a.key, skip_special=a.no_special)
            c.print(f"\n[bold]heads where '{q}' attends most to '{a.key}'[/]"
                    + (" (special tokens left out, renormalised; the pictures show the same):" if a.no_special
                       else " (special tokens included; the pictures show the same):"))
            for layer, h, w in ranked[: a.top]:
                c.print(f"  layer {layer} head {h}: {w:.3f}")
            if head is None:
                head = ranked[0][:2]
    shown = lens.without_special(maps.weights, maps.special) if a.no_special else maps.weights
    note = "special tokens left out, rows renormalised" if a.no_special else "special tokens included"
    grid = viz.attention_grid(shown, maps.tokens, out / "attention_grid.png", highlight=head, title=note)
    c.print(f"\nwrote {grid}")
    if head is not None:
        layer, h = head
        qpos = lens.word_positions(maps, a.query)[-1] if a.query else None
        big = viz.attention_map(shown[layer, h], maps.tokens, out / f"attention_L{layer}_H{h}.png",
                                title=f"layer {layer}, head {h} ({note})", mark_query=qpos)
        c.print(f"wrote {big}")
    if maps.cross is not None:
        cross = viz.attention_grid(maps.cross, maps.target_tokens, out / "cross_attention_grid.png",
                                   title="cross-attention: target (down) looking at source (across)")
        c.print(f"wrote {cross}")
        mean = viz.attention_map(maps.cross.mean((0, 1)), maps.target_tokens, out / "cross_attention_mean.png",
                                 title="cross-attention, mean over decoder layers and heads",
                                 key_tokens=maps.tokens)
        c.print(f"wrote {mean}")

        c.print("\n[bold]cross-attention[/] (mean over decoder layers and heads): each output token, and the "
                "source tokens attended to while choosing it")
        for out_tok, keys in cross_attention_rows(maps, min(3, a.top)):
            c.print(f"  {out_tok!r:>14s} <- " + "  ".join(f"{t!r}:{w:.2f}" for t, w in keys), markup=False)
    return 0


def _embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sentence")
    p.add_argument("--model", default="minilm", help="minilm (default) or an encoder folder")
    p.add_argument("--json", action="store_true", help='print {"embedding": [...]}')


@verb("embed", "print the normalised sentence embedding of an encoder model", _embed_args)
def cmd_embed(a: argparse.Namespace) -> int:
    import torch


    if not a.sentence.strip():
        raise LlmlabError("the sentence is empty; give some text to embed")
    model = load(a.model)
    if model.config.arch != "bert":
        raise LlmlabError(f"{a.model} is a {model.config.arch} model; embeddings need an encoder (e.g. minilm)")
    ids = model.tokenizer.encode(a.sentence, add_special_tokens=True)[: model.config.block_size]
    with torch.no_grad():
        e = model.sentence_embedding(torch.tensor([ids]))[0]
    if a.json:
        print(json.dumps({"embedding": e.tolist()}))
    else:
        print(f"dim {e.numel()}, L2 norm {float(e.norm()):.4f}")
        print(" ".join(f"{v:+.4f}" for v in e.tolist()))
    return 0


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="minilm, an llmlab run folder or a Hugging Face folder")
    p.add_argument("--all", action="store_true", help="list every layer's parameters")


@verb("info", "print a model's architecture, parameter counts and layer shapes", _info_args)
def cmd_info(a: argparse.Namespace) -> int:
    from rich.table import Table


    model = load(a.model)
    cfg = model.config
    c = console()
    n_params = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for n, p in model.named_parameters() if "emb" in n or n.startswith(("wte", "wpe")))
    c.print(f"[bold]{a.model}[/]: {cfg.arch}  layers={cfg.n_layer}"
            + (f"+{cfg.n_dec_layer} decoder" if cfg.arch == "seq2seq" else "")
            + f"  heads={cfg.n_head}"
            + (f" (kv {cfg.n_kv_head})" if getattr(cfg, "n_kv_head", 0) and cfg.n_kv_head != cfg.n_head else "")
            + f"  width={cfg.n_embd}  ffn={cfg.inner}  vocab={cfg.vocab_size}  "
              f"context={cfg.block_size}")
    c.print(f"positions={cfg.position}  norm={cfg.norm} ({'pre' if cfg.prenorm else 'post'}-LN)  "
            f"activation={cfg.activation}  tied={cfg.tie_embeddings}  bias={cfg.bias}")
    c.print(f"parameters: {n_params:,} total, {n_params - emb:,} excluding embeddings")
    if model.tokenizer is not None:
        c.print(f"tokenizer: {model.tokenizer.kind}, {model.tokenizer.vocab_size} tokens")
    t = Table("parameter", "shape", "count")
    for n, p in model.named_parameters():
        if not a.all and any(f".{i}." in f".{n}" for i in range(1, 1000)):
            continue
        t.add_row(n, "x".join(map(str, p.shape)), f"{p.numel():,}")
    c.print(t)
    if not a.all:
        c.print("(layers 1 and up repeat layer 0; --all lists every parameter)")
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="an llmlab GPT run folder, a Hugging Face folder, a .gguf file or smollm2")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")


@verb("export", "write a decoder as a Hugging Face folder (Llama when it has Llama's parts, else GPT-2)", _export_args)
def cmd_export(a: argparse.Namespace) -> int:

    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and not a.force:
        raise LlmlabError(f"{out} exists and is not empty; choose a new folder or pass --force")
    model = load(a.run)
    export(model, out)
    cls = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"wrote {out} (transformers.{cls}.from_pretrained({str(out)!r}) loads it)")
    return 0


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="an llmlab run folder, a Hugging Face GPT-2/Llama folder, a .gguf file or smollm2")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several (batched)")
    p.add_argument("--chat", action="append", metavar="MESSAGE",
                   help="a user message, sent through the model's own chat template (e.g. smollm2); repeat for "
                        "several conversations (batched)")
    p.add_argument("--system", help="with --chat: the system prompt of every conversation")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0, help="subtract this from the logit of every "
                   "token already generated (OpenAI's presence_penalty)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="subtract this times a token's count so "
                   "far (OpenAI's frequency_penalty)")
    p.add_argument("--stop", action="append", default=[], help="stop before this string; repeatable")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--json", action="store_true", help="print the completions as JSON")
    p.add_argument("--beams", type=int, default=1, help="seq2seq runs: beam search with this many beams")
    p.add_argument("--length-penalty", type=float, default=0.6,
                   help="seq2seq beam search: GNMT length-penalty exponent (0 = none; default 0.6)")


@verb("generate", "generate text from a trained model", _generate_args)
def cmd_generate(a: argparse.Namespace) -> int:

    model = load(a.run)
    if model.config.arch == "seq2seq":  # each --prompt is a source to transform

        return cli_generate(model, a)
    if a.beams != 1:
        raise LlmlabError("--beams is for encoder-decoder (seq2seq) runs; sample or use --greedy with this model")
    cfg = GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=0.0 if a.greedy else a.temperature,
                           top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty,
                           presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty,
                           stop=tuple(a.stop), seed=a.seed, use_cache=not a.no_cache)
    if a.chat:
        if a.prompt:
            raise LlmlabError("give either --prompt (raw text) or --chat (messages through the chat template)")
        return _chat(model, a, cfg)
    if a.system:
        raise LlmlabError("--system goes with --chat; with --prompt write the system text into the prompt")
    prompts = a.prompt or ["\n"]
    err = console(stderr=True)

    def warn(msg: str) -> None:
        err.print(f"[yellow]warning:[/] {msg}")

    stream = len(prompts) == 1 and not a.json
    if stream:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()

    def on_text(i: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    outs = generate_text(model, prompts, cfg, on_text=on_text if stream else None, warn=warn)
    if stream:
        sys.stdout.write("\n")
    elif a.json:
        print(json.dumps([{"prompt": p, "completion": o} for p, o in zip(prompts, outs)]))
    else:
        for p, o in zip(prompts, outs):
            print(f"--- {p!r}\n{p}{o}")
    return 0


def _chat(model: torch.nn.Module, a: argparse.Namespace, cfg: GenerationConfig) -> int:
    """`llmlab generate MODEL --chat ...`: each --chat is one conversation (an optional system prompt, then
    the user's message), rendered by the model's own template; one conversation streams."""
    if any(not m.strip() for m in a.chat):
        raise LlmlabError("a --chat message is empty; give the user's message")
    convs = [([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": m}]
             for m in a.chat]
    block = model.config.block_size
    prompts, stop = [], ()
    for conv in convs:
        ids, stop = prompt_ids(model, conv)
        prompts.append(ids[-(block - 1):])
    if stop:
        cfg = dataclasses.replace(cfg, stop=tuple(cfg.stop) + tuple(stop))
    stream = len(prompts) == 1 and not a.json

    def on_text(i: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    res = generate_from_ids(model, prompts, cfg, on_text=on_text if stream else None)
    if stream:
        sys.stdout.write("\n")
    elif a.json:
        print(json.dumps([{"message": m, "reply": r.text, "finish_reason": r.finish_reason}
                          for m, r in zip(a.chat, res)]))
    else:
        for m, r in zip(a.chat, res):
            print(f"--- {m!r}\n{r.text}")
    return 0


def _perplexity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="an llmlab run folder or a Hugging Face GPT-2 folder")
    p.add_argument("--data", required=True, help="a text file, folder, glob or JSONL file")
    p.add_argument("--text-field", default="text")
    p.add_argument("--encoding-errors", default="strict", choices=["strict", "replace", "ignore"])
    p.add_argument("--json", action="store_true")


@verb("perplexity", "report loss and perplexity of a model on any text", _perplexity_args)
def cmd_perplexity(a: argparse.Namespace) -> int:

    model = load(a.run)
    docs = load_corpus(a.data, a.text_field, a.encoding_errors)
    r = perplexity(model, docs)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['tokens']:,} tokens: loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.3f}")
    return 0

