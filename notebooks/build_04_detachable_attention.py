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

import metadyn as md

QUICK = os.environ.get("METADYN_QUICK") == "1"
DEVICE = md.pick_device("auto")  # a GPU when there is one
data = md.load_classification("digits", seed=0)
test_x = data.test.x.to(DEVICE)
torch.manual_seed(0)
base = md.resnet_exits(data.in_shape, data.num_classes, depth=8, exits=(1, 2, 3), width=8 if QUICK else 16)
model = md.AttentiveExits(base, data.in_shape, attention="later", source="final").to(DEVICE)
md.fit(model, data.train, epochs=3 if QUICK else 20, lr=0.05, progress=False)  # stage 1: exit-wise CE
model.eval()
print("later-layer attention, test accuracy per exit:",
      [f"{100 * a:.1f}" for a in md.anytime_accuracy(md.collect_logits(model, data.test.x), data.test.y)])
print("MFLOPs per exit (each needs the final stage):", [f"{m:.3f}" for m in md.exit_mflops(model, data.in_shape)])"""),
    new_markdown_cell("""## The later-layer variant is not deployable

Its exit 0 reads the final stage's map. Running it stage by stage (real early exit) is refused with a clear error,
and its cost per exit includes the stages its mask needs."""),
    new_code_cell("""try:
    md.dynamic_exit(model, data.test.x[:8], md.ThresholdPolicy([0.9, 0.9, 0.0]))
except md.NotDeployableError as e:
    print("NotDeployableError:", e)"""),
    new_markdown_cell("""## Stage 2: detachable modules imitate the later-layer attention

The attention map of an activation tensor is `Q = Σ_c |A_c|²`, L2-normalised; the transfer distance is
`‖Q_det/‖Q_det‖ − Q_later/‖Q_later‖‖₂`, measured here on the activations each exit's head reads."""),
    new_code_cell("""torch.manual_seed(0)
md.add_detachable(model)  # freezes trunk, final exit and later-layer modules (kept in eval mode while training)
before = md.transfer_distances(model, test_x)
md.fit(model, data.train, loss=md.detachable_loss(beta=10.0), epochs=2 if QUICK else 10, lr=0.01, progress=False)
model.eval()
after = md.transfer_distances(model, test_x)
print("attention-transfer distance per early exit, before:", [f"{d:.3f}" for d in before],
      "after:", [f"{d:.3f}" for d in after])"""),
    new_code_cell("""x = test_x[:6]
with torch.no_grad():
    out = model(x)
x = x.cpu()
h_det, h_later = out.transfer[0]  # exit 0: the activations its head reads under each mask
side = h_det.shape[-1]
fig, axes = plt.subplots(3, len(x), figsize=(1.6 * len(x), 5))
for j in range(len(x)):
    for r, (img, title) in enumerate(((x[j, 0], "input"),
                                      (md.attention_map(h_later)[j].view(side, side).cpu(), "later-layer"),
                                      (md.attention_map(h_det)[j].view(side, side).cpu(), "detachable"))):
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
    new_code_cell("""x1 = torch.zeros(1, *data.in_shape, device=DEVICE)
n_before, f_before = len(list(model.named_modules())), md.count_flops(model, x1)
md.prune_later(model)
print(f"modules: {n_before} -> {len(list(model.named_modules()))}; forward MFLOPs: {f_before / 1e6:.3f} -> "
      f"{md.count_flops(model, x1) / 1e6:.3f}")
print("removed as saturated (mask ≈ 1 on val):", md.prune_saturated(model, data.val.x.to(DEVICE)) or "none")
print("detachable MFLOPs per exit:", [f"{m:.3f}" for m in md.exit_mflops(model, data.in_shape)])
policy = md.ThresholdPolicy([0.9, 0.9, 0.0])
dyn, ref = md.dynamic_exit(model, data.test.x, policy), md.simulated_exit(model, data.test.x, policy)
print("dynamic_exit == picking from the full forward:", torch.equal(dyn.exit_idx, ref.exit_idx)
      and torch.allclose(dyn.logits, ref.logits, atol=1e-5))
print("detachable, test accuracy per exit:",
      [f"{100 * a:.1f}" for a in md.anytime_accuracy(md.collect_logits(model, data.test.x), data.test.y)])"""),
    new_markdown_cell("""## All variants, same seeds (`metadyn run attention_digits`)

No attention, own-layer (SCAN) attention, later-layer attention (upper bound, not deployable), detachable
(distilled) and the β = 0 control (the same stage 2 without attention transfer). Mean ± std over seeds (one seed
with the quick settings). `md.run_task` returns the output folder and the metrics it wrote to `metrics.json`:
`metrics["rows"]` holds one row per variant (`group`) and exit (test accuracy, its std over seeds, MFLOPs),
`metrics["budgets"]` the early exit at a FLOPs budget and `metrics["comparisons"]` the paired differences
(Holm-corrected over all of them) that `report.md` summarises."""),
    new_code_cell("""out = Path(tempfile.mkdtemp()) / "attention_digits"
_, metrics = md.run_task("attention_digits", quick=QUICK, out=out, progress=False)
rows = metrics["rows"]
exits = sorted({r["exit"] for r in rows})
table = ["| variant | " + " | ".join(f"exit {e}" for e in exits) + " |", "|:--|" + "--:|" * len(exits)]
for group in dict.fromkeys(r["group"] for r in rows):
    cell = {r["exit"]: f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f} ({r['mflops']:.2f})"
            for r in rows if r["group"] == group}
    table.append(f"| `{group}` | " + " | ".join(cell.get(e, "—") for e in exits) + " |")
display(Markdown("**Test accuracy per exit (%)**, mean ± std over seeds (cumulative MFLOPs)\\n\\n"
                 + "\\n".join(table)))
print("early exit, thresholds fitted on val for a fraction of the no-attention network's FLOPs:")
for b in metrics["budgets"]:
    if b["accuracy"] is not None:
        print(f"  {b['group']} at {100 * b['budget_fraction']:.0f}%: {100 * b['accuracy']:.1f}% test accuracy "
              f"at {b['mflops']:.3f} MFLOPs")
print("paired differences:")
for c in metrics["comparisons"]:
    print(f"  {c['group']} − {c['against']} at {c['at']}: {100 * c['difference']:+.1f} points "
          f"(n = {c['n']}): {c['verdict']}")"""),
]


def main() -> None:
    nb = new_notebook(cells=CELLS, metadata={"kernelspec": {"display_name": "Python 3", "language": "python",
                                                            "name": "python3"}})
    path = Path(__file__).resolve().parent / "04_detachable_attention.ipynb"
    nbformat.write(nb, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
