"""Build notebooks/04_detachable_attention.ipynb (unexecuted; CI executes it with METADYN_QUICK=1).

    .venv/bin/python notebooks/build_04_detachable_attention.py
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell("""# 04 — Detachable attention: early exits that borrow later layers' attention, then let go of it

The seed's Idea 4: later layers have better coarse features, so an early exit could attend with a mask computed
from a *later* stage. At inference an exit that leaves early has not computed that stage, so the later-layer
attention is **distilled** (attention transfer, Zagoruyko & Komodakis, ICLR 2017) into a parallel module that reads
only the exit's own features, and the later-layer modules are **pruned** before test.

Recipe (both stages use the core `fit`): (1) train the network with later-layer attention on the early exits;
(2) add a detachable SCAN-style attention module per early exit and train it (and the early heads) with exit CE +
β/2 · attention transfer towards the later-layer attention, everything else frozen; then prune.
Set `METADYN_QUICK=1` for the small settings CI uses."""),
    new_code_cell("""import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

from metadyn.attention import (AttentiveExits, NotDeployableError, add_detachable, attention_map, detachable_loss,
                               exit_mflops, prune_later, prune_saturated, transfer_distances)
from metadyn.core.backbones import resnet_exits
from metadyn.core.flops import count_flops
from metadyn.core.inference import collect_logits, dynamic_exit, simulated_exit
from metadyn.core.policies import ThresholdPolicy, anytime_accuracy
from metadyn.core.train import fit
from metadyn.data import load_classification
from metadyn.runner import run_task

QUICK = os.environ.get("METADYN_QUICK") == "1"
data = load_classification("digits", seed=0)
torch.manual_seed(0)
base = resnet_exits(data.in_shape, data.num_classes, depth=8, exits=(1, 2, 3), width=8 if QUICK else 16)
model = AttentiveExits(base, data.in_shape, attention="later", source="final")
fit(model, data.train, epochs=3 if QUICK else 20, lr=0.05, device="cpu", progress=False)  # stage 1: exit-wise CE
model.eval()
print("later-layer attention, test accuracy per exit:",
      [f"{100 * a:.1f}" for a in anytime_accuracy(collect_logits(model, data.test.x), data.test.y)])
print("MFLOPs per exit (each needs the final stage):", [f"{m:.3f}" for m in exit_mflops(model, data.in_shape)])"""),
    new_markdown_cell("""## The later-layer variant is not deployable

Its exit 0 reads the final stage's map. Running it stage by stage (real early exit) is refused with a clear error,
and its cost per exit includes the stages its mask needs."""),
    new_code_cell("""try:
    dynamic_exit(model, data.test.x[:8], ThresholdPolicy([0.9, 0.9, 0.0]))
except NotDeployableError as e:
    print("NotDeployableError:", e)"""),
    new_markdown_cell("""## Stage 2: detachable modules imitate the later-layer attention

The attention map of an activation tensor is `Q = Σ_c |A_c|²`, L2-normalised; the transfer distance is
`‖Q_det/‖Q_det‖ − Q_later/‖Q_later‖‖₂`, measured here on the activations each exit's head reads."""),
    new_code_cell("""torch.manual_seed(0)
add_detachable(model)  # freezes trunk, final exit and later-layer modules
before = transfer_distances(model, data.test.x)
loss = detachable_loss(beta=10.0)
fit(model, data.train, loss=loss, epochs=2 if QUICK else 10, lr=0.01, device="cpu", progress=False,
    callbacks=loss.callbacks(model))
model.eval()
after = transfer_distances(model, data.test.x)
print("attention-transfer distance per early exit, before:", [f"{d:.3f}" for d in before],
      "after:", [f"{d:.3f}" for d in after])"""),
    new_code_cell("""x = data.test.x[:6]
with torch.no_grad():
    out = model(x)
h_det, h_later = out.transfer[0]  # exit 0: the activations its head reads under each mask
side = h_det.shape[-1]
fig, axes = plt.subplots(3, len(x), figsize=(1.6 * len(x), 5))
for j in range(len(x)):
    for r, (img, title) in enumerate(((x[j, 0], "input"),
                                      (attention_map(h_later)[j].view(side, side), "later-layer"),
                                      (attention_map(h_det)[j].view(side, side), "detachable"))):
        axes[r, j].imshow(img, cmap="gray" if r == 0 else "viridis")
        axes[r, j].axis("off")
        if j == 0:
            axes[r, j].set_title(title, fontsize=8, loc="left")
plt.suptitle("exit 0 attention maps (test digits)")
plt.show()"""),
    new_markdown_cell("""## Pruning: the later-layer modules leave the graph

After `prune_later` they are gone from `named_modules`, the forward's FLOPs drop by exactly their cost, and the
network runs stage by stage: `dynamic_exit` (batch compaction) gives what picking from the full forward gives.
`prune_saturated` would also remove any attention module whose mask is ≈1 everywhere on validation data."""),
    new_code_cell("""x1 = torch.zeros(1, *data.in_shape)
n_before, f_before = len(list(model.named_modules())), count_flops(model, x1)
prune_later(model)
print(f"modules: {n_before} -> {len(list(model.named_modules()))}; forward MFLOPs: {f_before / 1e6:.3f} -> "
      f"{count_flops(model, x1) / 1e6:.3f}")
print("removed as saturated (mask ≈ 1 on val):", prune_saturated(model, data.val.x) or "none")
print("detachable MFLOPs per exit:", [f"{m:.3f}" for m in exit_mflops(model, data.in_shape)])
policy = ThresholdPolicy([0.9, 0.9, 0.0])
dyn, ref = dynamic_exit(model, data.test.x, policy), simulated_exit(model, data.test.x, policy)
print("dynamic_exit == picking from the full forward:", torch.equal(dyn.exit_idx, ref.exit_idx)
      and torch.allclose(dyn.logits, ref.logits, atol=1e-5))
print("detachable, test accuracy per exit:",
      [f"{100 * a:.1f}" for a in anytime_accuracy(collect_logits(model, data.test.x), data.test.y)])"""),
    new_markdown_cell("""## All variants, same seeds (`metadyn run tasks/attention_digits.yaml`)

No attention, own-layer (SCAN) attention, later-layer attention (upper bound, not deployable), detachable
(distilled) and the β = 0 control (the same stage 2 without attention transfer). Mean ± std over seeds (one seed
with the quick settings)."""),
    new_code_cell("""out = Path(tempfile.mkdtemp()) / "attention_digits"
_, metrics = run_task(Path("..") / "tasks" / "attention_digits.yaml", quick=QUICK, out=out, progress=False)
report = (out / "report.md").read_text()
display(Markdown("## Test accuracy" + report.split("## Test accuracy", 1)[1].split("![")[0]))"""),
]


def main() -> None:
    nb = new_notebook(cells=CELLS, metadata={"kernelspec": {"display_name": "Python 3", "language": "python",
                                                            "name": "python3"}})
    path = Path(__file__).resolve().parent / "04_detachable_attention.ipynb"
    nbformat.write(nb, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
