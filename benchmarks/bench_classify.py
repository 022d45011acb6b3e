"""Topic classification of Python-reference paragraphs (`llmlab dataset pydoc-topics`, 8 sections):
the real pretrained MiniLM fine-tuned, the same architecture from random weights fine-tuned the same way,
and a TF-IDF + logistic-regression baseline (scikit-learn), all on the same held-out split.

    cd benchmarks && ../.venv/bin/python bench_classify.py            # about 5 min on an idle 2-core machine
    cd benchmarks && ../.venv/bin/python bench_classify.py --steps 20  # a quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import table, write_result
from llmlab.checkpoint import save_run_model
from llmlab.datasets import pydoc_topics, write_dataset
from llmlab.interop import load
from llmlab.metrics import accuracy, macro_f1
from llmlab.models import build_model
from llmlab.train.classify import make_finetune_config, split_examples
from llmlab.train.loop import train


def tfidf_baseline(texts: list[str], labels: list[str], tr: list[int], va: list[int]) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    x_tr = vec.fit_transform([texts[i] for i in tr])
    clf = LogisticRegression(C=10.0, max_iter=3000)
    names = sorted(set(labels))
    idx = {n: i for i, n in enumerate(names)}
    clf.fit(x_tr, [idx[labels[i]] for i in tr])
    pred = clf.predict(vec.transform([texts[i] for i in va])).tolist()
    secs = time.perf_counter() - t0
    yt = [idx[labels[i]] for i in va]
    return {"accuracy": accuracy(yt, pred), "macro_f1": macro_f1(yt, pred, len(names)), "train_s": secs}


def finetune(base: str, data: Path, out: Path, steps: int, lr: float, max_len: int, threads: int) -> dict:
    cfg = make_finetune_config(base, str(data), {"max_iters": steps, "lr": lr, "min_lr": lr / 10,
                                                 "eval_interval": max(steps // 3, 1), "max_len": max_len,
                                                 "threads": threads, "warmup_iters": min(30, steps // 5)})
    res = train(cfg, out)
    ev = json.loads((out / "eval.json").read_text())
    return {"accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"], "val_loss": ev["val_loss"],
            "train_s": res.elapsed, "steps": res.step, "lr": lr, "n_val": ev["n_val"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sections", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_classify_"))
    rows = pydoc_topics(a.sections, seed=0)
    data = write_dataset(rows, work / "topics.csv")
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    tr, va = split_examples(labels, 0.2)  # the split ClassifyObjective makes (val_fraction 0.2)
    counts = {lab: labels.count(lab) for lab in sorted(set(labels))}
    majority = max(sum(labels[i] == lab for i in va) for lab in counts) / len(va)
    results = {"tfidf_logreg": tfidf_baseline(texts, labels, tr, va)}
    print("tf-idf + logistic regression:", results["tfidf_logreg"], flush=True)
    results["minilm_finetuned"] = finetune("minilm", data, work / "minilm", a.steps, 1e-4, a.max_len, a.threads)
    print("MiniLM fine-tuned:", results["minilm_finetuned"], flush=True)
    minilm = load("minilm")  # the same architecture and tokenizer, fresh random weights
    torch.manual_seed(0)
    scratch = build_model(minilm.config.replace(pooler=False, extra={"note": "MiniLM architecture, random init"}))
    save_run_model(work / "scratch-base", scratch, minilm.tokenizer, {"note": "random MiniLM-shaped encoder"})
    results["minilm_arch_from_scratch"] = finetune(str(work / "scratch-base"), data, work / "scratch", a.steps,
                                                   5e-4, a.max_len, a.threads)
    print("same architecture from scratch:", results["minilm_arch_from_scratch"], flush=True)
    rows_out = [["model", "accuracy", "macro-F1", "training time (s)"]]
    names = {"minilm_finetuned": "MiniLM (pretrained) fine-tuned", "minilm_arch_from_scratch":
             "same architecture, random init", "tfidf_logreg": "TF-IDF + logistic regression"}
    for k in ("minilm_finetuned", "minilm_arch_from_scratch", "tfidf_logreg"):
        r = results[k]
        rows_out.append([names[k], f"{r['accuracy']:.3f}", f"{r['macro_f1']:.3f}", f"{r['train_s']:.1f}"])
    print(table(rows_out))
    print(f"{len(va)} held-out / {len(tr)} training paragraphs, {len(counts)} sections; majority class "
          f"{majority:.3f}; {a.steps} steps of 16, max_len {a.max_len}, {a.threads} threads")
    path = write_result("classify", {"results": results, "n_train": len(tr), "n_val": len(va), "classes": counts,
                                     "majority_accuracy": majority, "steps": a.steps, "batch_size": 16,
                                     "max_len": a.max_len, "threads": a.threads})
    print(f"wrote {path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
