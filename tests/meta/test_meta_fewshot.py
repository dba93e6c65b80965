"""Prototypical exits, few-shot evaluation, class pools (fake folder trees), adapters and the task kind."""

import json
import warnings

import numpy as np
import pytest
import torch

from metadyn.core.backbones.conv4 import conv4_exits
from metadyn.core.flops import ExitCosts
from metadyn.data import EpisodeSampler
from metadyn.errors import InputError
from metadyn.interop import TasksetEpisodes, from_torchmeta_batch, split_task, to_torchmeta_batch
from metadyn.meta import MetaLearner
from metadyn.meta.data import fewshot_pool
from metadyn.meta.evaluate import anytime_costs, evaluate_episodes, mean_ci
from metadyn.meta.protonet import ProtoExits, prototype_logits


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_prototype_logits_are_negative_squared_distances_to_class_means():
    s = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    logits = prototype_logits(s, torch.tensor([0, 0, 1]), torch.tensor([[1.0, 1.0]]), 2)
    assert torch.allclose(logits, torch.tensor([[-1.0, -10.0]]))


def test_protonet_exits_train_and_predict_every_exit():
    pool = fewshot_pool("digits", "train")
    sampler = EpisodeSampler(pool, 3, 2, 4, seed=0)
    net = conv4_exits((1, 8, 8), 3, width=8, norm="group")
    proto = ProtoExits(net)
    loss = proto(sampler.batch(0, 2))
    loss.backward()
    assert net.blocks[0][0].weight.grad.abs().sum() > 0
    assert len(proto.predict(*[getattr(sampler.episode(0), a) for a in ("support_x", "support_y", "query_x")])) == 4


def test_evaluation_confidence_interval_and_shapes():
    m, h = mean_ci(torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert m == 0.5 and h == pytest.approx(1.96 * np.std([0, 1, 0, 1], ddof=1) / 2)
    pool = fewshot_pool("digits", "test")
    sampler = EpisodeSampler(pool, 3, 1, 5, seed=0)
    learner = MetaLearner(conv4_exits((1, 8, 8), 3, width=4, norm="batch_episodic"), "fomaml")
    res = evaluate_episodes(learner, sampler, 3)
    assert res.accuracy.shape == (3, 4) and res.logits[0].shape == (45, 3) and res.labels.shape == (45,)


def test_anytime_costs_share_or_recompute_the_trunk():
    c = ExitCosts(stem=1, stages=[10, 20, 30], heads=[1, 2, 3])
    assert anytime_costs(c, [False] * 3) == c.cumulative == [12, 34, 67]
    assert anytime_costs(c, [True] * 3) == [12, 12 + 33, 12 + 33 + 64]
    assert anytime_costs(c, [False, False, True]) == [12, 34, 34 + 64]


def test_digits_pools_have_disjoint_classes():
    classes = [set(fewshot_pool("digits", s).classes) for s in ("train", "val", "test")]
    assert classes == [{0, 1, 2, 3}, {4, 5, 6}, {7, 8, 9}]
    with pytest.raises(InputError, match="unknown few-shot dataset"):
        fewshot_pool("mnist", "train")
    with pytest.raises(InputError, match="takes no root"):
        fewshot_pool("glyphs", "train", root="/tmp")


def _png(path, value, size=(6, 6), mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    shape = size if mode == "L" else (*size, 3)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=mode).save(path)


def test_omniglot_folders_are_split_by_character_and_inverted(tmp_path):
    for part in ("images_background", "images_evaluation"):
        for a in range(2):
            for c in range(3):
                for j in range(2):
                    _png(tmp_path / part / f"alpha{a}" / f"character{c:02d}" / f"{j}.png", 255)
    pools = {s: fewshot_pool("omniglot", s, str(tmp_path), size=4) for s in ("train", "val", "test")}
    assert [len(p.classes) for p in pools.values()] == [8, 2, 2]  # 12 characters: 2/3, 1/6, the rest
    assert pools["train"].x.shape[1:] == (1, 4, 4) and float(pools["train"].x.max()) == 0.0  # white -> 0
    with pytest.raises(InputError, match="images_background"):
        fewshot_pool("omniglot", "train", str(tmp_path / "images_background"))
    rotated = fewshot_pool("omniglot", "val", str(tmp_path), size=4, rotations=True)
    assert len(rotated.classes) == 4 * len(pools["val"].classes) and len(rotated) == 4 * len(pools["val"])
    with pytest.raises(InputError, match="rotations"):
        fewshot_pool("omniglot", "val", str(tmp_path), rotations="yes")


def test_rotated_classes_are_the_rotated_images():
    from metadyn.data import ClassPool

    x = torch.arange(2 * 9, dtype=torch.float32).reshape(2, 1, 3, 3)
    pool = ClassPool(x, torch.tensor([0, 5])).with_rotations()
    assert pool.classes == [0, 1, 2, 3, 20, 21, 22, 23]
    for c, base in ((0, 0), (5, 1)):
        for r in range(4):
            (i,) = pool.indices(4 * c + r).tolist()
            assert torch.equal(pool.x[i], torch.rot90(x[base], r, dims=(1, 2)))
    with pytest.raises(InputError, match="square"):
        ClassPool(torch.zeros(1, 1, 2, 3), torch.tensor([0])).with_rotations()


def test_miniimagenet_csv_and_cifar_fs_split_files(tmp_path):
    mini = tmp_path / "mini"
    rows = ["filename,label"]
    for c in range(2):
        for j in range(3):
            _png(mini / "images" / f"n{c}_{j}.jpg", 10 * c, mode="RGB")
            rows.append(f"n{c}_{j}.jpg,n{c}")
    (mini / "test.csv").write_text("\n".join(rows) + "\n")
    pool = fewshot_pool("miniimagenet", "test", str(mini), size=5)
    assert pool.x.shape == (6, 3, 5, 5) and pool.classes == [0, 1]
    with pytest.raises(InputError, match="train.csv"):
        fewshot_pool("miniimagenet", "train", str(mini))
    cfs = tmp_path / "cifar_fs"
    for name in ("apple", "bee"):
        for j in range(2):
            _png(cfs / "data" / name / f"{j}.png", 50, size=(32, 32), mode="RGB")
    (cfs / "splits" / "bertinetto").mkdir(parents=True)
    (cfs / "splits" / "bertinetto" / "val.txt").write_text("apple\nbee\n")
    assert fewshot_pool("cifar_fs", "val", str(cfs)).x.shape == (4, 3, 32, 32)
    # a class listed twice (one episode held it under two labels) or in two meta-splits (meta-test leakage), and an
    # image listed twice (support and query of the same episode), were read silently
    (cfs / "splits" / "bertinetto" / "val.txt").write_text("apple\nbee\napple\n")
    with pytest.raises(InputError, match="'apple' is listed twice in the 'val'"):
        fewshot_pool("cifar_fs", "val", str(cfs))
    (cfs / "splits" / "bertinetto" / "val.txt").write_text("apple\nbee\n")
    (cfs / "splits" / "bertinetto" / "test.txt").write_text("bee\n")
    with pytest.raises(InputError, match="'bee' is in both the 'val' and the 'test'"):
        fewshot_pool("cifar_fs", "val", str(cfs))
    (mini / "test.csv").write_text("\n".join(rows + [rows[1]]) + "\n")
    with pytest.raises(InputError, match="image 'n0_0.jpg' is listed twice"):
        fewshot_pool("miniimagenet", "test", str(mini))
    (mini / "test.csv").write_text("\n".join(rows) + "\n")
    (mini / "val.csv").write_text("filename,label\nother.jpg,n1\n")
    with pytest.raises(InputError, match="class 'n1' is in both the 'test' and the 'val'"):
        fewshot_pool("miniimagenet", "test", str(mini))


def test_torchmeta_batches_round_trip_and_tasks_split_class_major():
    batch = (torch.randn(2, 3, 1, 4, 4), torch.arange(3).repeat(2, 1), torch.randn(2, 6, 1, 4, 4),
             torch.arange(3).repeat_interleave(2).repeat(2, 1))
    back = from_torchmeta_batch(to_torchmeta_batch(batch))
    assert all(torch.equal(a, b) for a, b in zip(batch, back))
    with pytest.raises(InputError, match="'train' and 'test'"):
        from_torchmeta_batch({"train": batch[:2]})
    x = torch.arange(6.0)[:, None]
    ep = split_task(x, torch.tensor([7, 3, 7, 3, 7, 3]), k_shot=1)
    assert ep.support_x.flatten().tolist() == [1.0, 0.0] and ep.query_y.tolist() == [0, 0, 1, 1]


def test_learn2learn_taskset_feeds_the_meta_learner():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("learn2learn")
    from metadyn.interop import to_learn2learn_taskset

    pool = fewshot_pool("digits", "train")
    source = TasksetEpisodes(to_learn2learn_taskset(pool, 3, 1, 2, num_tasks=4), k_shot=1)
    sx, sy, qx, qy = source.batch(0, 2)
    assert sx.shape == (2, 3, 1, 8, 8) and qy.tolist()[0] == [0, 0, 1, 1, 2, 2]
    learner = MetaLearner(conv4_exits((1, 8, 8), 3, width=4, norm="group"), "maml")
    learner((sx, sy, qx, qy)).backward()


def test_fewshot_task_runs_quick_and_refuses_bad_input(tmp_path):
    from metadyn.runner import run_task

    sets = ["episodes.n_query=2", "data.options.samples_per_class=3", "eval.test_episodes=3", "eval.val_episodes=2",
            "model.options.width=4", "eval.baselines=[final_exit, protonet]"]
    out, metrics = run_task("tasks/fewshot_glyphs_5w1s.yaml", sets, quick=True, out=tmp_path / "run", progress=False)
    assert [r["exit"] for r in metrics["rows"] if r["group"] == "exits"] == [0, 1, 2, 3]
    assert list(dict.fromkeys(r["group"] for r in metrics["rows"])) == ["exits", "final_exit", "protonet"]
    assert all(r["ci95"] >= 0 for r in metrics["rows"])
    comps = metrics["comparisons"]
    assert {(c["against"], c["n"]) for c in comps} == {("final_exit", 3), ("protonet", 3)}  # paired by episode
    assert (out / "report.md").is_file() and (out / "accuracy_vs_mflops.png").is_file()
    assert json.loads((out / "metrics.json").read_text())["kind"] == "fewshot"
    for bad, msg in (("meta.algorithm=reptile", "unknown meta-learning algorithm"),
                     ("eval.baselines=[mine]", "unknown eval.baselines"),
                     ("model.options.norm=batch", "per-episode normalisation"),
                     ("episodes.n_way=200", "n_way=200")):
        with pytest.raises(InputError, match=msg):
            run_task("tasks/fewshot_glyphs_5w1s.yaml", [*sets, bad], quick=True, out=tmp_path / "bad")
        assert not (tmp_path / "bad").exists()


def test_fewshot_task_reports_the_spread_over_training_seeds(tmp_path):
    from metadyn.runner import run_task

    sets = ["episodes.n_query=2", "data.options.samples_per_class=3", "eval.test_episodes=3", "eval.val_episodes=2",
            "model.options.width=4", "eval.baselines=[protonet]"]
    one = run_task("tasks/fewshot_glyphs_5w1s.yaml", sets, quick=True, out=tmp_path / "one", progress=False)[1]
    out, two = run_task("tasks/fewshot_glyphs_5w1s.yaml", [*sets, "seeds=[0, 1]"], quick=True, out=tmp_path / "two",
                        progress=False)
    per_seed = two["extra"]["per_seed"]
    # seed 0 of the two-seed run is the one-seed run (the same episodes and initialisation)
    assert [r["accuracy"] for r in per_seed if r["seed"] == 0] == [r["accuracy"] for r in one["rows"]]
    for r in two["rows"]:
        accs = [p["accuracy"] for p in per_seed if p["group"] == r["group"] and p["exit"] == r["exit"]]
        assert len(accs) == 2 and r["n"] == 2 and "ci95" not in r
        assert r["accuracy"] == pytest.approx(sum(accs) / 2)
        assert r["accuracy_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    assert {(c["against"], c["n"]) for c in two["comparisons"]} == {("protonet", 2)}  # paired by seed
    text = (out / "report.md").read_text()
    assert "mean ± std over 2 training seeds" in text and "Every training seed" in text


def test_protonet_evaluation_runs_in_eval_mode_and_leaves_batchnorm_statistics_alone():
    """ProtoExits accepts BatchNorm with running statistics (Snell et al. test in eval mode), but evaluate_episodes
    ran it in train mode: every validation episode of meta_fit was written into the running statistics."""
    from metadyn.data import ClassPool

    torch.manual_seed(0)
    pool = ClassPool(torch.rand(40, 1, 12, 12), torch.arange(8).repeat_interleave(5))
    net = conv4_exits((1, 12, 12), 3, width=4, norm="batch").train()
    bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [(b.running_mean.clone(), int(b.num_batches_tracked)) for b in bn]
    res = evaluate_episodes(ProtoExits(net), EpisodeSampler(pool, 3, 1, 2), 4)
    assert all(torch.equal(b.running_mean, m) and int(b.num_batches_tracked) == n for b, (m, n) in zip(bn, before))
    assert net.training and all(m.training for m in net.modules())  # the caller's mode is restored
    net.eval()
    again = evaluate_episodes(ProtoExits(net), EpisodeSampler(pool, 3, 1, 2), 4)
    assert torch.equal(res.accuracy, again.accuracy)  # the same numbers as a network put in eval mode


def test_a_two_view_consistency_is_refused_in_the_outer_loop():
    """MetaLearner(consistency=simsiam) split one episode's support + query images in two halves and paired them as
    two augmented views of the same images (a finite, meaningless loss)."""
    import metadyn as md

    net = conv4_exits((1, 12, 12), 3, width=4, norm="batch_episodic")
    with pytest.raises(InputError, match="two augmented views"):
        MetaLearner(net, "fomaml", consistency=md.consistency_method(net, (1, 12, 12), kind="simsiam", hidden=4))
    MetaLearner(net, "fomaml", consistency=md.consistency_method(net, (1, 12, 12), kind="byol", hidden=4))
