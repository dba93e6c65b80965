"""Build notebooks/00_quickstart.ipynb (unexecuted; CI executes it with METADYN_QUICK=1).

    .venv/bin/python notebooks/build_00_quickstart.py
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell("""# 00 — Quickstart: real early exit in a few lines

Train a small multi-exit ResNet on scikit-learn's `digits`, fit confidence thresholds on a validation split,
and run **dynamic inference**: samples that exit early leave the batch, so later blocks never run for them.
Set `METADYN_QUICK=1` for the small settings CI uses."""),
    new_code_cell("""import os

import torch

import metadyn as md

QUICK = os.environ.get("METADYN_QUICK") == "1"
DEVICE = md.pick_device("auto")  # a GPU when there is one; everything below runs where the network is
torch.manual_seed(0)
data = md.load_classification("digits", seed=0)
net = md.resnet_exits(in_shape=data.in_shape, num_classes=data.num_classes, depth=8 if QUICK else 20,
                   exits=(1, 2, 3) if QUICK else (1, 3, 5, 7, 9), width=8 if QUICK else 16).to(DEVICE)
state = md.fit(net, data.train, epochs=2 if QUICK else 20, lr=0.05, progress=False)  # the data goes to DEVICE once
print(data)
print("train loss per epoch:", [round(h["loss"], 3) for h in state.history])"""),
    new_markdown_cell("""## Every exit on its own (anytime prediction) and its cost"""),
    new_code_cell("""costs = md.exit_costs(net, data.in_shape)
test_logits = md.collect_logits(net, data.test.x)
for i, (acc, mf) in enumerate(zip(md.anytime_accuracy(test_logits, data.test.y), costs.mflops())):
    print(f"exit {i}: {100 * acc:.1f}% at {mf:.3f} MFLOPs")"""),
    new_markdown_cell("""## Thresholds fitted on validation for half the FLOPs, then real early exit on test

`md.policy_for_budget` fits one confidence threshold per exit on the validation logits so that the expected cost
there is at most the budget, and returns the `ThresholdPolicy`; `md.dynamic_exit` applies it."""),
    new_code_cell("""val_logits = md.collect_logits(net, data.val.x)
policy = md.policy_for_budget(val_logits, costs.cumulative, budget=0.5 * costs.full)
print(policy)
net.eval()
result = md.dynamic_exit(net, data.test.x, policy)
acc = (result.logits.argmax(-1).cpu() == data.test.y).float().mean().item()
print(f"dynamic early exit: {100 * acc:.1f}% at {md.expected_cost(result.exit_idx, costs.cumulative) / 1e6:.3f} MFLOPs "
      f"(static network: {costs.full / 1e6:.3f})")
print("samples leaving at each exit:", torch.bincount(result.exit_idx, minlength=net.num_exits).tolist())"""),
    new_code_cell("""import matplotlib.pyplot as plt

counts = torch.bincount(result.exit_idx, minlength=net.num_exits)
plt.bar(range(net.num_exits), counts.tolist())
plt.xlabel("exit")
plt.ylabel("test samples")
plt.title("where samples leave")
plt.show()"""),
]


def main() -> None:
    nb = new_notebook(cells=CELLS)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, Path(__file__).with_name("00_quickstart.ipynb"))


if __name__ == "__main__":
    main()
