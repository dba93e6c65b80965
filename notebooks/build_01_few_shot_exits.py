"""Build notebooks/01_few_shot_exits.ipynb (unexecuted; CI executes it with METADYN_QUICK=1).

    .venv/bin/python notebooks/build_01_few_shot_exits.py
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell("""# 01 — Few-shot learning with every exit as a task

The seed's *Idea 2*: in meta-learning, use each auxiliary classifier of an early-exit network as a task, so
that the parameters adapt quickly **at every exit** from a few examples. Unlike ordinary meta-learning the
tasks share only part of the parameters: exit *i* adapts the trunk up to block *i* and its own head, and
nothing else. Here: sample a 5-way 1-shot episode of procedural glyphs (classes never seen in
meta-training), meta-train a Conv-4 with MAML over its four exits, adapt each exit on the support set and
look at accuracy per exit and per inner step. Set `METADYN_QUICK=1` for the small settings CI uses."""),
    new_code_cell("""import os

import matplotlib.pyplot as plt
import torch

import metadyn as md

QUICK = os.environ.get("METADYN_QUICK") == "1"
DEVICE = md.pick_device("auto")  # a GPU when there is one
torch.manual_seed(0)
torch.set_num_threads(1 if QUICK else torch.get_num_threads())
train = md.EpisodeSampler(md.fewshot_pool("glyphs", "train", samples_per_class=20), n_way=5, k_shot=1, n_query=15,
                          seed=0)
test = md.EpisodeSampler(md.fewshot_pool("glyphs", "test", samples_per_class=20), n_way=5, k_shot=1, n_query=15,
                         seed=2)
print(train)
print(test)"""),
    new_markdown_cell("## An episode of meta-test classes: one example per class (support) and the queries to label"),
    new_code_cell("""ep = test.episode(0)
fig, axes = plt.subplots(2, 5, figsize=(7, 3))
for c in range(5):
    axes[0, c].imshow(ep.support_x[c, 0], cmap="gray_r")
    axes[0, c].set_title(f"support, class {c}", fontsize=8)
    axes[1, c].imshow(ep.query_x[ep.query_y == c][0, 0], cmap="gray_r")
    axes[1, c].set_title(f"a query of class {c}", fontsize=8)
for a in axes.flat:
    a.axis("off")
plt.tight_layout()
plt.show()"""),
    new_markdown_cell("""## Meta-training: MAML with each exit as its own task

`md.MetaLearner` runs, for every episode and every exit, an inner loop over that exit's path only
(the network run on dicts of parameters, as `torch.func.functional_call` does); the meta-objective is the sum
of the exits' query losses.
`learner(batch)` computes the meta-gradient episode by episode; `.backward()` hands it to the optimizer."""),
    new_code_cell("""net = md.conv4_exits((1, 28, 28), 5, width=8 if QUICK else 32, norm="batch_episodic").to(DEVICE)
learner = md.MetaLearner(net, "maml", inner_lr=0.4, inner_steps=1)
opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
iterations, meta_batch = (3, 2) if QUICK else (150, 4)
for it in range(iterations):
    loss = learner([t.to(DEVICE) for t in train.batch(it * meta_batch, meta_batch)])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if it % max(1, iterations // 5) == 0 or it == iterations - 1:
        acc = ", ".join(f"{100 * a:.0f}%" for a in learner.last_stats["query_accuracy"])
        print(f"iteration {it:4d}: meta-loss {loss.item():.3f}, query accuracy per exit after adaptation: {acc}")
for e, (path, head) in learner.exit_paths(ep.support_x.to(DEVICE)).items():
    print(f"exit {e} adapts {len(path)} parameter tensors (head: {', '.join(n.split('net.')[1] for n in head)})")"""),
    new_markdown_cell("## Adapting each exit on the episode's support set: accuracy per exit and per inner step"),
    new_code_cell("""steps = range(0, 4 if QUICK else 6)
episodes = 3 if QUICK else 50
per_step = torch.stack([md.evaluate_episodes(learner, test, episodes, steps=s).accuracy.mean(0) for s in steps])
fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.3))
for e in range(net.num_exits):
    a1.plot(list(steps), 100 * per_step[:, e], "o-", label=f"exit {e}")
a1.set_xlabel("inner steps at test time")
a1.set_ylabel(f"accuracy (%), {episodes} meta-test episodes")
a1.legend(fontsize=8)
a1.grid(alpha=0.3)
res = md.evaluate_episodes(learner, test, episodes, steps=3)
means, cis = zip(*res.mean_ci())
a2.bar(range(net.num_exits), [100 * m for m in means], yerr=[100 * c for c in cis], capsize=3)
a2.set_xlabel("exit")
a2.set_ylabel("accuracy (%) ± 95% CI, 3 steps")
plt.tight_layout()
plt.show()
for e, (m, c) in enumerate(zip(means, cis)):
    print(f"exit {e}: {100 * m:.1f} ± {100 * c:.1f}% (chance 20%)")"""),
    new_markdown_cell("""`metadyn run fewshot_glyphs_5w1s` (in Python: `md.run_task("fewshot_glyphs_5w1s")`) does
this at full size with model selection on meta-val classes, 600 meta-test episodes, the anytime few-shot curve and
the baselines (MAML on the final exit, joint multi-exit MAML, prototypical networks at every exit)."""),
]


def main() -> None:
    nb = new_notebook(cells=CELLS, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    nbformat.write(nb, Path(__file__).with_name("01_few_shot_exits.ipynb"))


if __name__ == "__main__":
    main()
