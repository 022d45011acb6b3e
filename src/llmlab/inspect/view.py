"""The interactive view: one self-contained HTML page (data inlined as JSON, JavaScript and CSS inlined, zero
network requests) with a head view, a model view, a query/key view, a logit lens and activation patching.

The numbers come from the model's own modules: attention weights from lens.compute_attention (the same values
`llmlab attention --json` prints), queries and keys from each attention layer's own q/k projection (and rotary
embedding) applied to the input a forward pre-hook sees, residual streams from forward hooks on the blocks."""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmlab.attention import causal_mask, repeat_kv
from llmlab.errors import LlmlabError
from llmlab.inspect.lens import compute_attention
from llmlab.inspect.view_assets import PAGE_CSS, PAGE_JS

MAX_TOKENS = 128  # the view's default limit (--max-tokens raises it)
FULL_PRECISION_LIMIT = 250_000  # attention values kept at full float32 precision up to this many numbers
QK_BUDGET = 400_000  # numbers of q and k vectors inlined (layers evenly spaced when all do not fit)


@dataclass
class ViewResult:
    path: Path
    data: dict
    size_bytes: int


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention blocks whose residual stream the view reads (the encoder's for seq2seq)."""
    for name in ("h", "layers", "encoder"):
        mods = getattr(model, name, None)
        if isinstance(mods, torch.nn.ModuleList) and len(mods) and hasattr(mods[0], "attn"):
            return list(mods)
    raise LlmlabError(f"{type(model).__name__} has no transformer blocks with attention weights to show; "
                      "give an llmlab run folder, a Hugging Face folder, a GGUF file, minilm or smollm2")


def _ids(model: torch.nn.Module, text: str) -> list[int]:
    tok = model.tokenizer
    return tok.encode_with_offsets(text, add_special_tokens=(model.config.arch == "bert"))[0]


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of a causal LM, or the final hidden states (B, T, C) of an encoder."""
    return model(x)


def _round(t: torch.Tensor, digits: int | None) -> list:
    if digits is None:
        return t.tolist()
    return torch.round(t.double() * 10**digits).div(10**digits).tolist()


def _lm_head(model: torch.nn.Module) -> Any:
    """hidden (B, T, C) -> logits, as the model reads its last layer; None when it has no LM head."""
    arch = model.config.arch
    if arch == "gpt":
        return lambda h: model.lm_head(model.ln_f(h))
    if arch == "bert" and getattr(model.config, "mlm_head", False):
        return lambda h: model.mlm_logits(model.final_norm(h))
    return None


def query_keys(model: torch.nn.Module, ids: list[int], layers: list[int]) -> dict:
    """Queries and keys (per head, after rotary positions, keys repeated for grouped-query attention) of the
    chosen layers, read by calling each attention layer's own projections on the input it receives."""
    blocks = blocks_of(model)
    got: dict[int, tuple[torch.Tensor, torch.Tensor, bool]] = {}

    def pre_hook(i: int):
        def fn(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if kwargs.get("memory") is not None:
                return
            h = args[0]
            B, T, C = h.shape
            qkv = mod.qkv(h)
            q, k, _ = mod._heads_all(qkv)  # (B, nh, T, hs), (B, n_kv, T, hs)
            if mod.rotary is not None:
                pos = kwargs.get("positions")
                pos = pos if pos is not None else torch.arange(T, device=h.device)
                qk = qkv[..., : C + mod.kv_dim].view(B, T, mod.n_head + mod.n_kv_head, mod.head_dim)
                qk = mod.rotary(qk, pos, heads_first=False)
                q, k = qk[:, :, : mod.n_head].transpose(1, 2), qk[:, :, mod.n_head:].transpose(1, 2)
            k = repeat_kv(k, mod.groups)
            got[i] = (q[0].float(), k[0].float(), bool(kwargs.get("is_causal")))
        return fn

    handles = [blocks[i].attn.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i in layers]
    try:
        with torch.no_grad():
            if model.config.arch == "seq2seq":
                bos = model.tokenizer.bos_id if model.tokenizer.bos_id is not None else model.tokenizer.eos_id or 0
                model(torch.tensor([ids]), torch.tensor([[bos]]))
            else:
                model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return got


def qk_scores(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_k) + M): (H, T, hs) twice -> (H, T, T), the seed's formula on the real vectors."""
    T = q.size(1)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if causal:
        s = s + causal_mask(T, T)
    return torch.softmax(s, -1)


def logit_lens(model: torch.nn.Module, ids: list[int], top: int = 5) -> dict | None:
    """Top next-token predictions read off the residual stream before the first and after each layer
    (nostalgebraist 2020, "interpreting GPT: the logit lens"): final norm + unembedding applied early."""
    head = _lm_head(model)
    if head is None:
        return None
    blocks = blocks_of(model)
    resid: list[torch.Tensor] = []
    handles = [blocks[0].register_forward_pre_hook(lambda m, a: resid.append(a[0]))]
    handles += [b.register_forward_hook(lambda m, a, out: resid.append(out)) for b in blocks]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
            rows = []
            for r in resid:
                n_tok = model.tokenizer.vocab_size  # a padded vocabulary's extra rows are no tokens
                p = torch.softmax(head(r[0:1]).float()[..., :n_tok], -1)[0]  # (T, V)
                val, idx = p.topk(top, -1)
                rows.append([[[model.tokenizer.id_to_token(int(i)), round(float(v), 4)] for i, v in zip(ii, vv)]
                             for ii, vv in zip(idx, val)])
    finally:
        for h in handles:
            h.remove()
    return {"layers": ["embed"] + [str(i) for i in range(len(blocks))], "top": rows}


def _residuals(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    blocks = blocks_of(model)
    resid: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, out: resid.append(out.detach())) for b in blocks]
    try:
        with torch.no_grad():
            out = _forward(model, x)
    finally:
        for h in handles:
            h.remove()
    return out, resid


def activation_patching(model: torch.nn.Module, clean: str, corrupted: str) -> dict:
    """Run the corrupted prompt with the residual stream after layer l at position p replaced by the clean
    run's, for every (l, p) (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", causal
    tracing; Heimersheim & Nanda 2024 on normalisation). Normalised effect
    (m(patched) - m(corrupted)) / (m(clean) - m(corrupted)): 0 = no effect, 1 = the clean behaviour restored.

    m is the logit difference logit[a] - logit[b] at the last position, a and b the clean and corrupted runs'
    top next tokens; when they agree (or the model has no LM head) m is minus the distance of the final
    output (the last position's logits, or an encoder's mean-pooled hidden states) from the clean run's."""
    if model.config.arch == "seq2seq":
        raise LlmlabError("activation patching works on decoder-only and encoder models, not seq2seq ones")
    a_ids, b_ids = _ids(model, clean), _ids(model, corrupted)
    if len(a_ids) != len(b_ids):
        raise LlmlabError(f"the two prompts tokenise to different lengths ({len(a_ids)} and {len(b_ids)} tokens); "
                          "patching needs the same number of tokens: change words one token for one token")
    T = len(a_ids)
    blocks = blocks_of(model)
    clean_out, clean_res = _residuals(model, torch.tensor([a_ids]))
    corr_out, _ = _residuals(model, torch.tensor([b_ids]))
    is_lm = model.config.arch == "gpt"

    def final(out: torch.Tensor) -> torch.Tensor:
        return out[:, -1, : model.tokenizer.vocab_size].float() if is_lm else out.float().mean(1)

    a_tok, b_tok = int(final(clean_out).argmax()), int(final(corr_out).argmax())
    if is_lm and a_tok != b_tok:
        kind = f"logit[{model.tokenizer.id_to_token(a_tok)!r}] - logit[{model.tokenizer.id_to_token(b_tok)!r}]"

        def metric(out: torch.Tensor) -> torch.Tensor:
            f = final(out)
            return f[:, a_tok] - f[:, b_tok]
    else:
        kind = "minus the distance of the final output from the clean run's"
        ref = final(clean_out)

        def metric(out: torch.Tensor) -> torch.Tensor:
            return -(final(out) - ref).norm(dim=-1)
    m_clean, m_corr = float(metric(clean_out)), float(metric(corr_out))
    denom = m_clean - m_corr
    effects = []
    batch = torch.tensor([b_ids] * T)
    for li, block in enumerate(blocks):
        def patch(m: torch.nn.Module, a: tuple, out: torch.Tensor, li: int = li) -> torch.Tensor:
            out = out.clone()
            pos = torch.arange(T)
            out[pos, pos] = clean_res[li][0, pos].to(out.dtype)  # batch row p patches position p
            return out
        h = block.register_forward_hook(patch)
        try:
            with torch.no_grad():
                m = metric(_forward(model, batch))
        finally:
            h.remove()
        eff = (m - m_corr) / denom if abs(denom) > 1e-9 else torch.zeros_like(m)
        effects.append([round(float(e), 4) for e in eff])
    return {"clean": clean, "corrupted": corrupted, "metric": kind, "m_clean": m_clean, "m_corrupted": m_corr,
            "clean_tokens": [model.tokenizer.id_to_token(i) for i in a_ids],
            "corrupted_tokens": [model.tokenizer.id_to_token(i) for i in b_ids], "effects": effects}


def build_view_data(model: torch.nn.Module, text: str, patch: str | None = None, max_tokens: int = MAX_TOKENS,
                    name: str = "", digits: int | None = -1, qk_budget: int = QK_BUDGET) -> dict:
    """Everything the page shows, as JSON-ready data. digits: decimals kept for the attention weights (None =
    full float32 precision; -1 = full precision up to FULL_PRECISION_LIMIT numbers, else 4)."""
    if getattr(model, "tokenizer", None) is None or getattr(getattr(model, "config", None), "arch", None) is None:
        raise LlmlabError("this model has no tokenizer or no llmlab config, so there are no attention weights to "
                          "show; give an llmlab run folder, a Hugging Face folder, a GGUF file, minilm or smollm2")
    blocks_of(model)
    if not text.strip():
        raise LlmlabError("the text is empty; give some text to look at with --text")
    n = len(_ids(model, text))
    if n > max_tokens:
        raise LlmlabError(f"the text is {n} tokens; the view shows at most {max_tokens} (the page grows with the "
                          "square of the length); shorten it or raise the limit with --max-tokens N")
    maps = compute_attention(model, text)
    L, H, T, _ = maps.weights.shape
    if digits == -1:
        digits = None if maps.weights.numel() <= FULL_PRECISION_LIMIT else 4
    data: dict[str, Any] = {"model": name, "text": text, "arch": maps.arch, "tokens": maps.tokens,
                            "special": maps.special, "n_layers": L, "n_heads": H,
                            "weights": _round(maps.weights, digits), "precision": digits}
    if maps.cross is not None:
        data["target_tokens"] = maps.target_tokens
        data["cross_weights"] = _round(maps.cross, digits)
    hs = model.config.n_embd // model.config.n_head
    per_layer = 2 * H * T * hs
    n_qk = max(1, min(L, qk_budget // max(per_layer, 1)))
    layers = sorted({round(i * (L - 1) / max(n_qk - 1, 1)) for i in range(n_qk)}) if n_qk < L else list(range(L))
    got = query_keys(model, _ids(model, text), layers)
    data["qk"] = {"layers": layers, "head_dim": hs,
                  "causal": bool(got[layers[0]][2]) if got else False,
                  "q": [_round(got[i][0], 4) for i in layers], "k": [_round(got[i][1], 4) for i in layers]}
    data["lens"] = logit_lens(model, _ids(model, text)) if maps.arch != "seq2seq" else None
    data["lens_note"] = ("" if data["lens"] else
                         "this model has no language-model head to read the residual stream with (an encoder "
                         "without a masked-LM head, or a seq2seq model)")
    data["patch"] = activation_patching(model, text, patch) if patch else None
    return data


def render_page(data: dict) -> str:
    """The page: HTML, the CSS and the JavaScript written for it, and the data as inline JSON."""
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False)
    blob = blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    title = html.escape(f"llmlab view: {data.get('model') or 'model'}")
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'; "
            "script-src 'unsafe-inline'; img-src data:\">"
            f"<title>{title}</title><style>{PAGE_CSS}</style></head><body><div id='app'></div>"
            f"<script type='application/json' id='llmlab-data'>{blob}</script>"
            f"<script>{PAGE_JS}</script></body></html>")


def write_view(model: torch.nn.Module, text: str, out: str | Path, patch: str | None = None,
               max_tokens: int = MAX_TOKENS, name: str = "") -> ViewResult:
    """Write DIR/view.html (atomically) and return its path, data and size."""
    from llmlab.checkpoint import atomic_write_bytes

    data = build_view_data(model, text, patch=patch, max_tokens=max_tokens, name=name)
    page = render_page(data).encode()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "view.html"
    atomic_write_bytes(path, page)
    return ViewResult(path, data, len(page))


def serve_page(path: str | Path, port: int = 0):  # noqa: ANN201
    """An HTTP server on 127.0.0.1 serving the page's folder (call serve_forever(); port 0 = any free)."""
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(Path(path).parent))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)


__all__ = ["build_view_data", "render_page", "write_view", "serve_page", "activation_patching", "logit_lens",
           "query_keys", "qk_scores"]
