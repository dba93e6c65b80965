"""Build notebooks/02_data_free_conversion.ipynb (unexecuted; CI executes it with METADYN_QUICK=1).

    .venv/bin/python notebooks/build_02_data_free_conversion.py
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell("""# 02 — Data-free conversion: a static network becomes an early-exit one, without its data

Given only a trained static CNN, we synthesise **data impressions** from it (Zero-Shot Knowledge Distillation,
Nayak et al., ICML 2019), attach exits to the frozen network and train them by distillation from its final
output **on the impressions only**. The network's own output stays bit-identical. Set `METADYN_QUICK=1` for the
small settings CI uses."""),
    new_code_cell("""import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

import metadyn as md

QUICK = os.environ.get("METADYN_QUICK") == "1"
DEVICE = md.pick_device("auto")  # a GPU when there is one
torch.manual_seed(0)
data = md.load_classification("digits", seed=0)
test_x = data.test.x.to(DEVICE)
teacher = md.static_cnn(data.in_shape, data.num_classes, widths=(8, 16, 32) if QUICK else (16, 32, 64)).to(DEVICE)
md.fit(teacher, data.train, loss=md.labeled_ce, epochs=6 if QUICK else 15, lr=0.05, progress=False)
teacher.eval()
acc = (teacher(test_x).argmax(-1).cpu() == data.test.y).float().mean().item()
print(f"static teacher: {100 * acc:.1f}% test accuracy on {len(data.test)} digits")"""),
    new_markdown_cell("""## The teacher's softmax space: class similarities and Dirichlet targets

The cosine similarity of the final layer's class weight vectors, min-max normalised per row, is the
concentration of a Dirichlet distribution over softmax vectors, scaled by beta. With beta = 0.1 the targets
are peakier than with beta = 1 (the released code normalised the 0.1 away; here it is applied)."""),
    new_code_cell("""sim = md.class_similarity(md.final_layer_weight(teacher)).cpu()
plt.figure(figsize=(3.5, 3))
plt.imshow(sim, cmap="viridis", vmin=0, vmax=1)
plt.colorbar()
plt.title("class similarity")
plt.show()
classes = torch.full((2000,), 3)
for beta in (1.0, 0.1):
    targets = md.sample_targets(md.dirichlet_concentration(sim, classes, torch.full((2000,), beta)))
    print(f"beta = {beta}: mean largest target probability {targets.amax(-1).mean():.3f}")"""),
    new_markdown_cell("""## Impressions per class and the achieved match

All classes are optimised together, batch by batch (fresh noise and a fresh Adam state per batch), inputs
clamped to the data range [0, 1]. The KL between each target and the teacher's softmax at temperature tau is
what the optimisation reaches."""),
    new_code_cell("""steps = 40 if QUICK else 100
imps = md.synthesize_impressions(teacher, 200 if QUICK else 1280, in_shape=data.in_shape,  # where the teacher is
                                 settings=md.SynthesisSettings(steps=steps))
summary = imps.summary()
print(f"tau = {summary['tau']}: median KL {summary['median_kl']:.4f}, "
      f"argmax agreement {100 * summary['argmax_agreement']:.1f}%")
fig, axes = plt.subplots(data.num_classes, 6, figsize=(4.2, 7.5))
for c in range(data.num_classes):
    idx = torch.nonzero(imps.classes == c).flatten()[:6]
    for j, ax in enumerate(axes[c]):
        ax.axis("off")
        if j < len(idx):
            ax.imshow(imps.x[idx[j], 0], cmap="gray", vmin=0, vmax=1)
plt.suptitle("impressions, one row per class")
plt.show()"""),
    new_markdown_cell("""## Why not the paper's tau = 20?

With inputs kept in [0, 1] a small network cannot produce the logit gaps that a peaked target needs at a high
temperature: the achieved KL grows with tau (the default tau was chosen on the validation split)."""),
    new_code_cell("""for tau in (1.0, 2.0, 5.0, 20.0):
    s = md.synthesize_impressions(teacher, 60 if QUICK else 256, in_shape=data.in_shape,
                                  settings=md.SynthesisSettings(tau=tau, steps=steps)).summary()
    print(f"tau = {tau:4}: median KL {s['median_kl']:.4f}, argmax agreement {100 * s['argmax_agreement']:.1f}%"
          f"{'  (default)' if tau == md.DEFAULT_TAU else ''}")"""),
    new_markdown_cell("## Conversion: exits on the frozen teacher, trained on impressions (or noise, as a control)"),
    new_code_cell("""before = teacher(test_x)
epochs = 40 if QUICK else 30
rows = []
for name, x in (("impressions", imps.x), ("uniform noise", torch.rand_like(imps.x))):
    torch.manual_seed(1)
    net, _ = md.convert_to_early_exit(teacher, ["stages.0", "stages.1"], x, epochs=epochs,
                                      batch_size=32 if QUICK else 64, lr=0.01, optimizer="adam", weight_decay=0.0,
                                      progress=False)
    net.eval()
    assert torch.equal(net(test_x).logits[-1], before)  # the teacher's output is untouched
    acc = md.anytime_accuracy(md.collect_logits(net, data.test.x), data.test.y)
    rows.append(f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in acc) + " |")
display(Markdown("| transfer set | exit 0 | exit 1 | final (teacher) |\\n|:--|--:|--:|--:|\\n" + "\\n".join(rows)))"""),
    new_markdown_cell("""## Convert your own network: a torchvision ResNet-18 in one call

A user arrives with a trained network and its checkpoint (a `state_dict`). `md.build_teacher` builds it by name (a
torchvision model, a registered metadyn backbone, or `"package.module:function"`) and loads the checkpoint safely
(`weights_only=True`); its first convolution is rebuilt for the data's one channel. `md.list_cut_points` lists where
exits can go, with activation shapes and cumulative FLOPs; `md.convert` does the rest in one call: impressions with a
feature prior (`"bn"`: BatchNorm statistics; `"image"`: total variation + l2, for a ViT or ConvNeXt without
BatchNorm; `"auto"` picks), exits at even fractions of the FLOPs (`at="auto"`), thresholds for each budget fitted on
held-out **impressions** — fully data-free. The labelled test split passed as `data` is only scored. Here the
"user's" ResNet-18 is trained briefly on digits first (it stands for your own checkpoint)."""),
    new_code_cell("""ckpt = Path(tempfile.mkdtemp()) / "my_resnet18.pt"
mine = md.build_teacher("resnet18", num_classes=data.num_classes, in_channels=1)
md.fit(mine, data.train, loss=md.labeled_ce, epochs=3 if QUICK else 12, lr=0.05, progress=False)
torch.save(mine.state_dict(), ckpt)  # what a user brings

resnet = md.build_teacher("resnet18", checkpoint=ckpt, num_classes=data.num_classes, in_channels=1).to(DEVICE).eval()
example = data.train.x[:1].to(DEVICE)
for c in md.list_cut_points(resnet, example):
    if c.name.count(".") == 0:  # the top-level modules; every nested one is listed too
        print(f"{c.name:10s} {str(c.shape):16s} {c.mflops:7.3f} MFLOPs")
net, report = md.convert(resnet, at="auto", example_input=example, exits=3, num_impressions=256 if QUICK else 1024,
                         prior="bn", synthesis=md.SynthesisSettings(steps=20 if QUICK else 100),
                         data=(data.test.x, data.test.y), epochs=10 if QUICK else 30, progress=False)
assert torch.equal(net.eval()(data.test.x.to(DEVICE)).logits[-1], resnet(data.test.x.to(DEVICE)))  # untouched
display(Markdown(report.table()))"""),
    new_markdown_cell("""## The evaluation table (`metadyn run datafree_digits`)

Real data (upper bound), impressions, impressions with the BatchNorm prior, noise (control) and untrained
exits, mean ± std over seeds (one seed with the quick settings). `md.run_task` returns the output folder and
the metrics it wrote to `metrics.json`: `metrics["rows"]` holds one row per condition (`group`) and exit, with
the test accuracy, its std over seeds and the exit's MFLOPs; `metrics["comparisons"]` the paired differences
(Holm-corrected over all of them) that `report.md` summarises."""),
    new_code_cell("""out = Path(tempfile.mkdtemp()) / "datafree_digits"
_, metrics = md.run_task("datafree_digits", quick=QUICK, out=out, progress=False)
rows = metrics["rows"]
exits = sorted({r["exit"] for r in rows})
mflops = {r["exit"]: r["mflops"] for r in rows}
table = ["| condition | " + " | ".join(f"exit {e} ({mflops[e]:.2f} MFLOPs)" for e in exits) + " |",
         "|:--|" + "--:|" * len(exits)]
for group in dict.fromkeys(r["group"] for r in rows):
    acc = {r["exit"]: f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f}" for r in rows if r["group"] == group}
    table.append(f"| `{group}` | " + " | ".join(acc.get(e, "—") for e in exits) + " |")
display(Markdown("**Test accuracy per exit (%)**, mean ± std over seeds\\n\\n" + "\\n".join(table)))
for c in metrics["comparisons"]:
    print(f"{c['group']} − {c['against']} at {c['at']}: {100 * c['difference']:+.1f} points "
          f"(n = {c['n']}): {c['verdict']}")"""),
]


def main() -> None:
    nb = new_notebook(cells=CELLS, metadata={"kernelspec": {"display_name": "Python 3", "language": "python",
                                                            "name": "python3"}})
    path = Path(__file__).resolve().parent / "02_data_free_conversion.ipynb"
    nbformat.write(nb, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
