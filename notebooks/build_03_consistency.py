"""Build notebooks/03_consistency.ipynb (unexecuted; CI executes it with METADYN_QUICK=1).

    .venv/bin/python notebooks/build_03_consistency.py
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell("""# 03 — Consistency between early exits and the final exit, with few labels

The seed's Idea 3: force the representation between an early layer and its auxiliary classifier to agree
with the final exit's representation — on the exit branches, not the backbone — so that unlabeled data can
train the early exits. Each early exit gets a projection head and a predictor; the final exit's features sit
behind a stop-gradient (`md.ExitConsistency`, BYOL-, SimSiam- and L2-style; `md.consistency_method` builds it
for a network). `md.keep_labels` keeps a few labels per class and marks the rest unlabeled, as the `labelscarce`
task kind does.
Set `METADYN_QUICK=1` for the small settings CI uses."""),
    new_code_cell("""import os

import matplotlib.pyplot as plt
import torch

import metadyn as md

QUICK = os.environ.get("METADYN_QUICK") == "1"
DEVICE = md.pick_device("auto")  # a GPU when there is one
EPOCHS = 3 if QUICK else 30
data = md.load_classification("digits", seed=0)
y_scarce = md.keep_labels(data.train.y, per_class=5, seed=0)  # 5 labels per class, the rest is -1 (unlabeled)
print(f"{int((y_scarce >= 0).sum())} labeled and {int((y_scarce < 0).sum())} unlabeled training images")"""),
    new_markdown_cell("## The final exit never receives a gradient from the consistency term"),
    new_code_cell("""def new_net():
    torch.manual_seed(0)
    return md.resnet_exits(in_shape=data.in_shape, num_classes=10, depth=8, exits=(1, 2, 3), width=16).to(DEVICE)

net = new_net()
loss = md.consistency_method(net, data.in_shape, kind="byol").to(DEVICE)
loss.consistency(net(data.train.x[:32].to(DEVICE))).backward()
final = list(net.heads[-1].parameters()) + [p for b in net.block_range(2) for p in net.blocks[b].parameters()]
print("gradient reaching the final exit:", max(float(p.grad.abs().max()) if p.grad is not None else 0.0
                                               for p in final))
print("gradient reaching the first block:", float(net.blocks[0].residual[0].weight.grad.abs().max()))"""),
    new_markdown_cell("## CE on 5 labels per class vs CE + consistency on all the images"),
    new_code_cell("""results = {}
for name, make_loss in [("CE only", lambda m: md.ce_loss()),
                        ("CE + BYOL-style consistency", lambda m: md.consistency_method(m, data.in_shape, "byol"))]:
    net = new_net()
    md.fit(net, (data.train.x, y_scarce), loss=make_loss(net), epochs=EPOCHS, lr=0.05, augment=md.random_shift,
        progress=False)
    results[name] = md.anytime_accuracy(md.collect_logits(net, data.test.x), data.test.y)
    print(name, [f"{100 * a:.1f}%" for a in results[name]])"""),
    new_code_cell("""for name, acc in results.items():
    plt.plot(range(len(acc)), [100 * a for a in acc], "o-", label=name)
plt.xticks(range(3))
plt.xlabel("exit")
plt.ylabel("test accuracy (%)")
plt.title("5 labels per class (one seed; see tasks/labelscarce_*.yaml for 3 seeds)")
plt.legend()
plt.show()"""),
    new_markdown_cell("""The full experiment — 1, 5, 10 and 100 labels per class, three seeds, BYOL-, SimSiam- and
L2-style against CE only — is `metadyn run labelscarce_digits` (and `_glyphs`), in Python
`md.run_task("labelscarce_digits")`; its `report.md` gives mean ± std per exit, and `metrics["rows"]` the same
numbers per method and exit."""),
]


def main() -> None:
    nb = new_notebook(cells=CELLS)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, Path(__file__).with_name("03_consistency.ipynb"))


if __name__ == "__main__":
    main()
