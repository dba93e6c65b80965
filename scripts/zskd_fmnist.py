"""ZSKD's own experiment on Fashion-MNIST (Nayak et al., "Zero-Shot Knowledge Distillation in Deep Networks",
ICML 2019, Sec. 4.2), through metadyn's library, CPU-sized.

Teacher LeNet-5 (61,706 parameters; metadyn backbone ``lenet5``) trained on Fashion-MNIST's training file; data
impressions synthesised from the teacher alone (metadyn.datafree.synthesize_impressions); student LeNet-5-Half
(35,820 parameters; backbone ``lenet5_half``) trained only on the impressions by distillation from the teacher
at temperature ``--kd-tau`` (metadyn.datafree.distill_student); both scored on the official 10,000 test images.
The paper: teacher 90.84%, student from 48,000 impressions 79.62% (24,000: 72.15%).

Recipes (``--recipe``):
  paper    the paper's synthesis (metadyn.datafree.SynthesisSettings.paper(): tau 20, 1500 Adam steps at lr
           0.001, batches of 100, betas 1.0 and 0.1, inputs clamped to [0, 1]) and distillation at tau 20;
  metadyn  metadyn's defaults (metadyn.datafree.SynthesisSettings()), distillation at tau 20.
``--steps`` shortens the synthesis (CPU), ``--num`` sets the number of impressions, ``--tau`` / ``--init`` override
the synthesis temperature / start.

usage: OMP_NUM_THREADS=1 python scripts/zskd_fmnist.py --recipe metadyn --num 4800 --steps 50 --seeds 0 1 [--out DIR]
(each seed appends one JSON line to DIR/results.jsonl; teachers are checkpointed in DIR and reused)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from metadyn import datafree
from metadyn.core.train import fit, seed_everything
from metadyn.data import load_classification
from metadyn.datafree.teacher import FinalExit
from metadyn.registry import BACKBONES


def accuracy(model, x, y) -> float:
    return float((datafree.teacher_logits(model, x).argmax(-1) == y).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", choices=("paper", "metadyn"), default="metadyn")
    ap.add_argument("--num", type=int, default=4800)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--tau", type=float, default=None, help="synthesis temperature override")
    ap.add_argument("--init", default=None, help="synthesis init override (auto, uniform, lower)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--student-epochs", type=int, default=60)
    ap.add_argument("--student-lr", type=float, default=0.001)
    ap.add_argument("--kd-tau", type=float, default=20.0)
    ap.add_argument("--real-control", action="store_true", help="also distil on as many real training images")
    ap.add_argument("--out", default="runs/zskd_fmnist")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in a.seeds:
        t0 = time.time()
        # the official 60,000 training images: 57,000 train, 1,500 val and 1,500 calib (both unused); official test
        d = load_classification("fashion_mnist", root=None, seed=seed, val_fraction=0.025, calib_fraction=0.025)
        seed_everything(seed)
        teacher = BACKBONES.get("lenet5")(in_shape=d.in_shape, num_classes=10)
        ck = out / f"teacher_seed{seed}_e{a.teacher_epochs}.pt"
        fit(teacher, d.train, epochs=a.teacher_epochs, batch_size=64, lr=0.001, optimizer="adam", weight_decay=0.0,
            seed=seed, checkpoint=ck, progress=False)
        static = FinalExit(teacher).eval()
        t_acc = accuracy(static, d.test.x, d.test.y)
        t_teacher = time.time() - t0
        if a.recipe == "paper":
            s = datafree.SynthesisSettings.paper()
        else:
            s = datafree.SynthesisSettings()
        if a.steps is not None:
            s.steps = a.steps
        if a.tau is not None:
            s.tau = a.tau
        if a.init is not None:
            s.init = a.init
        t1 = time.time()
        imps = datafree.synthesize_impressions(static, a.num, in_shape=d.in_shape, settings=s, seed=seed)
        t_synth = time.time() - t1
        imps.plot(out / f"impressions_{a.recipe}_n{a.num}_s{s.steps}_tau{s.tau:g}_{s.init}_seed{seed}.png")
        sets = {"impressions": imps.x}
        if a.real_control:
            g = torch.Generator().manual_seed(seed)
            sets["real"] = d.train.x[torch.randperm(len(d.train.x), generator=g)[:a.num]]
        row = {"seed": seed, "recipe": a.recipe, "num": a.num, "settings": vars(s), "teacher_accuracy": t_acc,
               "impressions": imps.summary(), "teacher_s": round(t_teacher), "synth_s": round(t_synth)}
        for name, x in sets.items():
            torch.manual_seed(seed * 1009 + 2)
            student = BACKBONES.get("lenet5_half")(in_shape=d.in_shape, num_classes=10)
            datafree.distill_student(student, static, x, tau=a.kd_tau, epochs=a.student_epochs, batch_size=100,
                                     lr=a.student_lr, optimizer="adam", weight_decay=0.0, seed=seed, progress=False)
            row[f"student_{name}"] = accuracy(FinalExit(student), d.test.x, d.test.y)
        row["ratio"] = row["student_impressions"] / t_acc
        row["total_s"] = round(time.time() - t0)
        print(json.dumps(row), flush=True)
        rows.append(row)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
