"""Image captioning with a vision-language model: image data, images through the rollout worker and the learner,
and the model's files in a checkpoint."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from local_cluster import LocalCluster, can_mask
from PIL import Image
from rich.console import Console
from transformers import AutoProcessor

from actors.learner import Learner
from actors.rollout_worker import RolloutWorker
from pipeline.batch import reward_column
from pipeline.config import load_config
from pipeline.data.inputs import load_inputs, with_builtin_defaults
from pipeline.driver.learner_group import start_learners
from pipeline.driver.trainer import train
from pipeline.errors import TokenforgeError
from pipeline.evaluate import evaluate_checkpoint
from pipeline.models.hf import builtin_paths, image_token_ids, response_logprobs
from pipeline.models.tiny import make_llava_processor, make_tiny_llava, make_word_tokenizer
from pipeline.outputs.dumps import read_dump
from pipeline.outputs.report import write_report
from pipeline.outputs.samples_view import show_samples
from pipeline.rewards.coco import coco_cider
from pipeline.rewards.components import Cider
from pipeline.storage import Storage

EXAMPLE = Path(__file__).parent.parent / "examples" / "captioning.yaml"
CAPTIONS = ["describe the picture", "a big red circle on the left", "two shapes : a small blue square"]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> str:
    """A randomly initialised tiny Llava with its processor: its samples are any words, the image token included
    unless the rollout worker keeps it out."""
    out = tmp_path_factory.mktemp("tiny_vlm")
    tokenizer = make_word_tokenizer(CAPTIONS)
    torch.manual_seed(0)
    make_tiny_llava(tokenizer).save_pretrained(out)
    make_llava_processor(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def builtin_rows(n: int) -> pa.Table:
    return pq.read_table(builtin_paths("captioning")[2]).slice(0, n)


def prompts_of_different_lengths() -> pa.Table:
    """Six built-in images with prompts of different lengths (so left padding differs row to row); two share their
    text but not their image."""
    texts = ["describe the picture", "describe", "the picture", "describe the picture", "picture", "a"]
    table = builtin_rows(6).set_column(0, "prompt", pa.array(texts))
    return table.append_column("group_id", pa.array(range(6), pa.int64()))


def test_images_stay_aligned_under_left_padding_and_learner_logprobs_agree(tiny_vlm):
    """Each prompt decoded greedily alone and in a batch of prompts of other lengths (other left padding) gets the
    same caption and log-probs; the learner's recomputed log-probs (prompt sharing on and off, the group sharing its
    image) equal the behaviour log-probs."""
    config = load_config(overrides=["rollout.max_new_tokens=12"])
    worker = RolloutWorker(config, tiny_vlm)
    prompts = prompts_of_different_lengths()
    batched = worker.generate(prompts, group_size=1, greedy=True)
    for row in range(prompts.num_rows):
        alone = worker.generate(prompts.slice(row, 1), group_size=1, greedy=True)
        assert alone.column("response_ids")[0] == batched.column("response_ids")[row]
        assert alone.column("behaviour_logprobs")[0].as_py() == pytest.approx(
            batched.column("behaviour_logprobs")[row].as_py(), abs=1e-5
        )
    sampled = worker.generate(prompts, group_size=3, step=1)
    for share in (True, False):
        learner = Learner(load_config(overrides=[f"learner.share_prompts={str(share).lower()}"]), tiny_vlm, tiny_vlm)
        assert learner.share_prompts is share
        mask, behaviour, _, sequences = learner._batch_tensors(sampled)
        assert len(sequences["images"]["pixel_values"]) == prompts.num_rows  # one image per group, not per sample
        with torch.no_grad():
            logprobs, _ = response_logprobs(learner.model, sequences, 1.0, 4096, learner.share_prompts)
        assert float(((logprobs - behaviour) * mask).abs().max()) < 1e-4


def test_the_image_token_is_never_sampled(tiny_vlm):
    """A random model samples every word of its vocabulary; the image token (which would ask for an image the
    prompt does not have) never, and the learner scores with the same distribution."""
    worker = RolloutWorker(load_config(overrides=["rollout.max_new_tokens=20", "rollout.temperature=2.0"]), tiny_vlm)
    sampled = worker.generate(prompts_of_different_lengths(), group_size=8, step=3)
    tokens = {t for row in sampled.column("response_ids").to_pylist() for t in row}
    (image_token,) = image_token_ids(worker.processor)
    assert image_token not in tokens and len(tokens) > len(CAPTIONS)
    learner = Learner(load_config(overrides=["rollout.temperature=2.0"]), tiny_vlm, tiny_vlm)
    mask, behaviour, _, sequences = learner._batch_tensors(sampled)
    with torch.no_grad():
        logprobs, _ = response_logprobs(learner.model, sequences, 2.0, 4096, learner.share_prompts)
    assert float(((logprobs - behaviour) * mask).abs().max()) < 1e-4


def test_a_checkpoint_holds_the_processor(tiny_vlm, tmp_path):
    learner = Learner(load_config(), tiny_vlm, tiny_vlm)
    learner.save_local(str(tmp_path))
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert processor.image_token == "<image>" and processor.image_processor.crop_size["height"] == 32


def test_what_does_not_take_images_yet_is_one_line_before_ray_starts():
    for overrides, expected in [
        (["rollout.backend=vllm"], r"^data.train_file: rollout.backend=vllm does not take images yet"),
        (["algorithm.estimator=gae", "critic={}"], r"^config section 'critic': a value model for a vision-language"),
    ]:
        with pytest.raises(TokenforgeError, match=expected):
            load_inputs(with_builtin_defaults(load_config(EXAMPLE, overrides=overrides)))


def write_png(path, colour) -> None:
    image = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(image, format="PNG")
    path.write_bytes(image.getvalue())


def test_image_paths_resolve_against_the_data_file_and_a_missing_one_is_one_line(tiny_vlm, tmp_path):
    (tmp_path / "images").mkdir()
    write_png(tmp_path / "images" / "red.png", (255, 0, 0))
    rows = [{"prompt": "describe the picture", "image": "images/red.png", "answer": "a red square"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"model.path={tiny_vlm}", f"data.train_file={tmp_path / 'train.jsonl'}"]
    config = load_config(overrides=overrides)
    train, _ = load_inputs(with_builtin_defaults(config))
    assert train.column("image").to_pylist() == [str(tmp_path / "images" / "red.png")]  # the workers open it as is
    worker = RolloutWorker(config, tiny_vlm)
    assert worker.generate(train.append_column("group_id", pa.array([0], pa.int64())), group_size=2).num_rows == 2

    rows.append({"prompt": "describe the picture", "image": "images/blue.png", "answer": "a blue square"})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TokenforgeError) as error:
        load_inputs(with_builtin_defaults(config))
    assert str(error.value) == (
        f"data.train_file: row 1: image file {str(tmp_path / 'images' / 'blue.png')!r} does not exist; fix the path, "
        "or set data.image_root to the directory the image paths are relative to"
    )
    other = tmp_path / "elsewhere"  # data.image_root instead of the file's directory
    other.mkdir()
    write_png(other / "blue.png", (0, 0, 255))
    rows[1]["image"] = "blue.png"
    (tmp_path / "train.jsonl").write_text(json.dumps(rows[1]) + "\n")
    train, _ = load_inputs(with_builtin_defaults(load_config(overrides=[*overrides, f"data.image_root={other}"])))
    assert train.column("image").to_pylist() == [str(other / "blue.png")]


def test_a_vision_language_model_trains_on_text_alone_when_the_data_has_no_images(tiny_vlm, tmp_path):
    """A multimodal checkpoint (Gemma-3 and Mistral-3 ship as ...ForConditionalGeneration) on text-only data takes the
    text path, as a causal LM does."""
    rows = [{"prompt": "describe", "answer": "a red circle"}, {"prompt": "the picture", "answer": "a square"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(overrides=[f"model.path={tiny_vlm}", f"data.train_file={tmp_path / 'train.jsonl'}"])
    train, _ = load_inputs(with_builtin_defaults(config))
    worker = RolloutWorker(config, tiny_vlm)
    samples = worker.generate(train.append_column("group_id", pa.array([0, 1], pa.int64())), group_size=2)
    assert samples.num_rows == 4
    assert image_token_ids(worker.processor)[0] not in samples.column("prompt_ids")[0].as_py()
    learner = Learner(config, tiny_vlm, tiny_vlm)
    mask, behaviour, _, sequences = learner._batch_tensors(samples)
    assert "images" not in sequences
    with torch.no_grad():
        logprobs, _ = response_logprobs(learner.model, sequences, 1.0, 4096, learner.share_prompts)
    assert float(((logprobs - behaviour) * mask).abs().max()) < 1e-4


def test_an_image_without_references_is_one_line(tmp_path):
    rows = builtin_rows(3).to_pylist()
    rows[1]["reference"] = []
    pq.write_table(pa.Table.from_pylist(rows, schema=builtin_rows(1).schema), tmp_path / "train.parquet")
    config = load_config(EXAMPLE, overrides=[f"data.train_file={tmp_path / 'train.parquet'}"])
    with pytest.raises(TokenforgeError, match=r"^data.train_file: row 1: `reference` is an empty list; give it at"):
        load_inputs(with_builtin_defaults(config))


def test_an_unreadable_image_names_the_prompt_group(tiny_vlm):
    prompts = pa.table({"prompt": ["describe"], "image": [b"not a png"], "group_id": pa.array([7], pa.int64())})
    with pytest.raises(TokenforgeError, match=r"^the prompt of group 7: cannot read the image \(9 bytes\)"):
        RolloutWorker(load_config(), tiny_vlm).generate(prompts, group_size=1)


def write_coco(tmp_path, table: pa.Table) -> tuple[str, str]:
    """The rows of `table` (built-in captioning rows) as a COCO captions file (images as PNG files in images/, one
    annotation per reference caption) and an unannotated image; returns (the JSON's path, the image directory)."""
    images = tmp_path / "images"
    images.mkdir()
    coco = {"images": [], "annotations": []}
    for i, row in enumerate(table.to_pylist()):
        (images / f"{i:03d}.png").write_bytes(row["image"]["bytes"])
        coco["images"].append({"id": 100 + i, "file_name": f"{i:03d}.png", "width": 32, "height": 32})
        coco["annotations"] += [
            {"id": len(coco["annotations"]), "image_id": 100 + i, "caption": c} for c in row["reference"]
        ]
    coco["images"].append({"id": 999, "file_name": "no_captions.png"})  # never loaded: nothing to score
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    return str(path), str(images)


def test_coco_captions_evaluate_as_the_same_images_in_parquet(tmp_path):
    """`tokenforge eval MODEL --data captions.json data.image_root=DIR trainer.eval_metrics=[cider]`: one sample per
    annotated image with all its captions as references, and the same eval/cider (pycocoevalcap's: document
    frequencies over these references) as the same images and captions from the built-in Parquet eval set."""
    model, _, eval_file = builtin_paths("captioning")
    rows = pq.read_table(eval_file).slice(0, 24)
    rows_file = tmp_path / "rows.parquet"
    pq.write_table(rows, rows_file)
    coco, images = write_coco(tmp_path, rows)
    metrics = ["trainer.eval_metrics=[cider]"]
    from_coco = evaluate_checkpoint(str(model), coco, [f"data.image_root={images}", *metrics])
    from_parquet = evaluate_checkpoint(str(model), str(rows_file), metrics)
    assert from_coco["eval_samples"] == from_parquet["eval_samples"] == 24
    assert (
        from_coco["eval/cider"] == pytest.approx(from_parquet["eval/cider"], rel=1e-12)
        and from_coco["eval/cider"] > 0.5
    )

    config = load_config(
        EXAMPLE, overrides=[f"data.train_file={coco}", "data.eval_file=null", f"data.image_root={images}"]
    )
    train, _ = load_inputs(with_builtin_defaults(config))
    assert train.column("reference").to_pylist() == rows.column("reference").to_pylist()
    assert train.column("image").to_pylist()[0] == f"{images}/000.png"
    assert set(train.column("prompt").to_pylist()) == {"describe the picture"}


BROKEN_COCO = {
    "annotations[0] is of image_id 2, which `images` does not list": {
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [{"image_id": 2, "caption": "x"}],
    },
    "annotations[0] has no caption (a non-empty string)": {
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [{"image_id": 1, "caption": None}],
    },
    "images[0] is not an object with `id` and `file_name`": {"images": ["a.png"], "annotations": []},
}


@pytest.mark.parametrize("problem", BROKEN_COCO)
def test_a_broken_coco_file_is_one_line(tmp_path, problem):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(BROKEN_COCO[problem]))
    config = load_config(EXAMPLE, overrides=[f"data.train_file={path}"])
    with pytest.raises(TokenforgeError) as error:
        load_inputs(with_builtin_defaults(config))
    assert str(error.value) == f"data.train_file: cannot read {str(path)!r}: ValueError: {problem}"


def test_a_json_lines_file_named_json_is_a_prompt_file_not_coco(tmp_path):
    """A `.json` file of one JSON object per line (datasets' Dataset.to_json writes them) loads as prompts."""
    from pipeline.data.loading import load_prompts

    path = tmp_path / "prompts.json"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    assert load_prompts(path, "data.train_file").column("prompt").to_pylist() == ["1+1=", "2+2="]


def test_self_critical_training_on_ray_with_images_evaluates_as_coco(ray_cluster, tmp_path):
    """The built-in captioning example, shortened, with the self_critical estimator on a real local Ray: each step's
    greedy baselines are scored and dumped (advantage 0) but not trained on; eval/cider is pycocoevalcap's CIDEr-D of
    the eval dump's captions; the checkpoint holds the processor."""

    overrides = [
        f"output_dir={tmp_path}",
        "trainer.total_steps=2",
        "trainer.prompts_per_step=6",
        "trainer.eval_every=2",
        "trainer.save_every=2",
        "rollout.group_size=2",
        "data.max_eval_samples=12",
        "algorithm.estimator=self_critical",
    ]
    train(load_config(EXAMPLE, overrides=overrides))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(r["reward/greedy_baseline/mean"] > 0 for r in records[1:])
    assert all(r["learner/tokens"] > 0 and r["rollout/samples"] == 6 * 2 for r in records[1:])  # greedy rows aside
    _, rollouts = read_dump(Storage(str(tmp_path)), "rollouts", 2)
    greedy = [row for row in rollouts.to_pylist() if row["greedy_baseline"]]
    assert len(greedy) == 6 and rollouts.num_rows == 6 * 3
    assert all(not any(row["advantages"]) and row["sample_id"] < 0 for row in greedy)
    console = Console(record=True, width=200, color_system=None)
    show_samples(str(tmp_path), group=greedy[0]["group_id"], console=console)
    assert "[greedy baseline] " + greedy[0]["response"] in console.export_text()
    trained = sum(len(row["response_ids"]) for row in rollouts.to_pylist() if not row["greedy_baseline"])
    assert records[2]["learner/tokens"] == trained  # the update's rows: the samples alone
    _, evaluated = read_dump(Storage(str(tmp_path)), "eval", 2)
    captions = [Cider.words(text) for text in evaluated.column("response").to_pylist()]
    refs = [[Cider.words(r) for r in refs] for refs in evaluated.column("reference").to_pylist()]
    assert records[-1]["eval/cider"] == pytest.approx(coco_cider(captions, refs))
    assert {"eval/bleu4", "eval/rouge"} <= records[-1].keys()
    assert AutoProcessor.from_pretrained(tmp_path / "checkpoints" / "step_2").image_token == "<image>"

    # seeing it: the report's grid of held-out images with their captions at the first and last eval, and samples
    write_report(str(tmp_path))
    assert Image.open(tmp_path / "captions.png").text["tokenforge-captions"] == "8"
    report = (tmp_path / "report.md").read_text()
    first_caption = evaluated.column("response")[0].as_py()
    assert "Captions at the first and last eval (steps 0 and 2)" in report and repr(first_caption) in report
    console = Console(record=True, width=200, color_system=None)
    show_samples(str(tmp_path), eval_dump=True, group=0, console=console)
    shown = " ".join(console.export_text().split())  # the title wraps
    assert "image: <image: " in shown and " | ".join(evaluated.column("reference")[0].as_py())[:100] in shown


def hand_scored(samples: pa.Table) -> pa.Table:
    """`samples` with a `reward/cider` column of sequence rewards (the response's length / 10, on its last token)."""
    rewards = [[0.0] * (len(ids) - 1) + [len(ids) / 10] for ids in samples.column("response_ids").to_pylist()]
    return samples.append_column(reward_column("cider"), pa.array(rewards, pa.list_(pa.float32())))


def test_lora_adapts_the_language_model_and_projector_and_its_weights_sync_to_a_rollout_worker(tiny_vlm):
    """model.lora on a vision-language model: adapters on the language model and the projector, the vision tower
    frozen (unless lora.vision_tower); a step changes the merged weights, which a rollout worker loads and samples
    with, its log-probs those the learner computes."""
    overrides = ["model.lora={r: 4}", "algorithm.estimator=grpo", "rollout.max_new_tokens=8"]
    config = load_config(EXAMPLE, overrides=overrides)
    learner = Learner(config, tiny_vlm, tiny_vlm)
    trained = [name for name, p in learner.model.named_parameters() if p.requires_grad]
    assert trained and not any("vision_tower" in n for n in trained)
    assert any("multi_modal_projector" in n for n in trained) and any("language_model" in n for n in trained)
    everywhere = Learner(
        load_config(EXAMPLE, overrides=[*overrides, "model.lora={vision_tower: true}"]), tiny_vlm, tiny_vlm
    )
    assert any("vision_tower" in n for n, p in everywhere.model.named_parameters() if p.requires_grad)

    worker = RolloutWorker(config, tiny_vlm)
    before = learner.get_weights()
    learner.train_step(hand_scored(worker.generate(prompts_of_different_lengths(), group_size=4, step=1)))
    after = learner.get_weights()
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    assert changed and not any("vision_tower" in n for n in changed)
    worker.set_weights(after, version=1)
    samples = worker.generate(prompts_of_different_lengths(), group_size=2, step=2, version=1)
    mask, behaviour, _, sequences = learner._batch_tensors(samples)
    with torch.no_grad():
        logprobs, _ = response_logprobs(learner.model, sequences, 1.0, 4096, learner.share_prompts)
    assert float(((logprobs - behaviour) * mask).abs().max()) < 1e-4


@pytest.mark.slow  # a 2-node cluster of its own: CI's slow step
def test_images_cross_nodes_through_ray_on_a_two_node_cluster(tmp_path):
    """Rollout and reward workers on a node that sees the data's directory as its own empty disk: the images reach
    the rollout worker inside the prompts (bytes through Ray, not a path), the cider component's document frequencies
    come from the driver (not from the data file), and the learner on the other node trains on them."""
    if not can_mask():
        pytest.skip("needs mount namespaces (unshare --mount) to give a node its own disk")
    data = tmp_path / "data"
    data.mkdir()
    _, train_file, eval_file = builtin_paths("captioning")
    pq.write_table(pq.read_table(train_file).slice(0, 64), data / "train.parquet")
    pq.write_table(pq.read_table(eval_file).slice(0, 8), data / "eval.parquet")
    nodes = LocalCluster()
    try:
        nodes.start_head(cpus=2, resources='{"head_node": 1}')
        nodes.add_node(cpus=1, resources='{"worker_node": 1}', masked=data)
        run = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "train", "-c", str(EXAMPLE)]
            + [f"output_dir={tmp_path / 'run'}", f"data.train_file={data / 'train.parquet'}"]
            + [f"data.eval_file={data / 'eval.parquet'}", "trainer.total_steps=2", "trainer.eval_every=2"]
            + ["trainer.save_every=2", "trainer.prompts_per_step=4", "rollout.group_size=2"]
            + ["algorithm.estimator=self_critical", "learner.resources={head_node: 0.5}", "learner.num_cpus=0.5"]
            + ["rollout.resources_per_worker={worker_node: 0.5}", "rollout.num_cpus_per_worker=0.5"]
            + ["reward.resources_per_worker={worker_node: 0.25}", "reward.num_cpus_per_worker=0.25"],
            env={**nodes.env, "RAY_ADDRESS": nodes.gcs, "PYTHONUNBUFFERED": "1"},
            cwd=Path(__file__).parent.parent,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        nodes.shutdown()
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2] and records[-1]["eval/cider"] > 0
    placement = json.loads((tmp_path / "run" / "placement.json").read_text())
    (learner,), (rollout,), (reward,) = placement["learner"], placement["rollout"], placement["reward"]
    assert rollout["node_id"] == reward["node_id"] != learner["node_id"]


def test_a_learner_group_computes_the_single_learners_gradient_on_images(ray_cluster, tiny_vlm):
    """learner.num_workers=2 (FSDP2 over the vision tower's, the projector's and the language model's blocks, gloo on
    CPU) on a batch of images with self_critical's greedy rows: every rank gets the single learner's gradient."""
    overrides = ["seed=5", "learner.grad_clip=1e9", "learner.num_cpus=0.5", "algorithm.is_cap=null"]
    overrides += ["trainer.max_staleness=0", "reward.weights={cider: 1.0}", "algorithm.estimator=self_critical"]
    config = load_config(EXAMPLE, overrides=overrides)
    worker = RolloutWorker(load_config(EXAMPLE, overrides=["rollout.max_new_tokens=8"]), tiny_vlm)
    batch = hand_scored(worker.generate(prompts_of_different_lengths(), group_size=3, step=1, greedy_baseline=True))
    expected, single = Learner(config, tiny_vlm, tiny_vlm).gradients(batch)
    grouped = load_config(EXAMPLE, overrides=[*overrides, "learner.num_workers=2"])
    group = start_learners(grouped, tiny_vlm, "vlm-group", timeout_s=180)
    try:
        results = group.call_all("gradients", batch)
    finally:
        group.close()
    largest = max(float(g.abs().max()) for g in expected.values())
    for got, metrics in results:
        assert got.keys() == expected.keys()
        assert max(float((got[n] - g).abs().max()) for n, g in expected.items()) <= 1e-6 * largest
        assert metrics["loss/policy"] == pytest.approx(single["loss/policy"], rel=1e-6)
