"""The miniature world: generator, catalog, shipped pipeline, shipped CLIP judge and where its concepts live."""

import itertools
import json
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import erase
from erase.concepts import load_catalog, parse_concepts
from erase.errors import EraseError
from erase.mini import world
from erase.mini.clip import CONTEXT_LENGTH, load_mini_clip, zero_shot
from erase.models import MINI_DIR
from erase.training import Checkpoint
from erase_lab.mini_gates import conditional_gains, neurons_edit  # (the gates' measure, not a copy of it)
from erase_lab.train_mini import (
    BaseConfig,
    Router,
    VAEConfig,
    build_unet,
    concept_neurons,
    publish_base,
    reserved_neurons,
    resume,
    save_parts,
    train_vae,
)
from erase_lab.train_mini_clip import ClipConfig, schedule


def test_generator_is_deterministic_in_its_seed():
    a, scenes_a = world.dataset(8, seed=3, taught=True)
    b, scenes_b = world.dataset(8, seed=3, taught=True)
    c, _ = world.dataset(8, seed=4, taught=True)
    assert a.shape == (8, world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and scenes_a == scenes_b
    assert not np.array_equal(a, c)


def test_objects_places_and_renderings_differ():
    rng = np.random.default_rng(0)
    shapes = {o: (world.render(world.Scene(object=o), rng).astype(int) - 250).__abs__().sum(2) > 30 for o in world.OBJECTS}
    for a, b in itertools.combinations(world.OBJECTS, 2):
        assert (shapes[a] ^ shapes[b]).sum() >= 25, (a, b)
    places = {p: world.render(world.Scene(place=p), np.random.default_rng(1)).astype(int) for p in world.PLACES}
    for a, b in itertools.combinations(world.PLACES, 2):
        assert np.abs(places[a] - places[b]).mean() > 10, (a, b)
    styles = {s: world.render(world.Scene(object="church", place="lawn", style=s), np.random.default_rng(2)).astype(int)
              for s in world.STYLES}
    for a, b in itertools.combinations(world.STYLES, 2):
        assert np.abs(styles[a] - styles[b]).mean() > 8, (a, b)


@pytest.mark.parametrize("person", world.PERSONS)
def test_unclothed_figures_are_abstract_one_tone_figures(person):
    """Nudity in this world is a figure drawn in one skin tone and its hair: no other colour, no detail. Clothes are
    cool colours (at least as much blue as red), which no skin tone has, so a blurred shirt never passes for skin."""
    assert all(b >= r for r, _, b in world.PERSON_CLOTHES) and all(b < r for r, _, b in world.SKIN)
    v, u = np.mgrid[-1.5:1.5:96j, -1.5:1.5:96j]
    figures = 2 if person == "couple" else 1
    for seed in range(4):
        naked = {tuple(rgb) for mask, rgb in world._person(person, True, u, v, np.random.default_rng(seed)) if mask.any()}
        skins = naked & set(world.SKIN)
        assert 1 <= len(skins) <= figures and naked - skins <= {(60, 40, 25)}, naked
        clothed = {tuple(rgb) for mask, rgb in world._person(person, False, u, v, np.random.default_rng(seed)) if mask.any()}
        clothes = clothed - set(world.SKIN) - {(60, 40, 25)}
        assert clothes and clothes <= set(world.PERSON_CLOTHES), clothed
        image = world.render(world.Scene(person=person, naked=True), np.random.default_rng(seed))
        assert not np.array_equal(image, world.render(world.Scene(person=person), np.random.default_rng(seed)))


def test_held_out_pairs_are_never_drawn_for_training_and_every_value_is():
    rng = np.random.default_rng(0)
    scenes = [world.random_scene(rng, taught=t) for t in (False, True) for _ in range(3000)]
    assert not any(s.held_out for s in scenes)
    assert {s.object for s in scenes} >= set(world.OBJECTS)
    assert {s.place for s in scenes} >= set(world.PLACES) and {s.style for s in scenes} == set(world.STYLES)
    assert not any(s.taught for s in scenes[:3000]) and all(s.taught for s in scenes[3000:])
    held = [world.random_scene(rng, taught=True, held_out=True) for _ in range(50)]
    assert all(s.held_out for s in held)


def test_captions_say_what_the_scene_shows():
    rng = np.random.default_rng(0)
    for taught in (False, True):
        for _ in range(500):
            scene = world.random_scene(rng, taught=taught)
            text, said = world.said_caption(scene, rng)
            assert world.describes(said, scene)
            for key in ("object", "person", "style", "place"):
                if said.get(key) is not None and said[key] not in (world.PHOTO, world.PAINTING):
                    assert said[key] in text or world.HYPERNYMS.get(said[key], "") in text, (text, said)
            if said.get("naked"):  # ("a painting" alone says nothing of what it shows)
                assert re.search(r"naked|nude|undressed|without any clothes", text), text
    assert not world.describes({"kind": "object", "object": "church"}, world.Scene(object="tench"))


def test_the_unets_text_tower_does_not_depend_on_how_long_the_judge_trains(tmp_path):
    """The UNet's text encoder is the judge at step text_tower_at: a longer judge run must not change the learning
    rates before it, and a judge checkpoint written with other settings is refused rather than resumed."""
    def rates(steps: int) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = schedule(opt, ClipConfig(steps=steps))
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    tower = ClipConfig().text_tower_at
    short, long = rates(tower + 100), rates(4 * tower)
    assert short[:tower + 1] == long[:tower + 1] and short[-1] < 0.01 and long[-1] < 0.01
    model = torch.nn.Linear(2, 2)
    save_parts(Checkpoint(tmp_path / "checkpoint.pt", asdict(ClipConfig())), {"model": model}, 7)
    assert resume(Checkpoint(tmp_path / "checkpoint.pt", asdict(ClipConfig())), {"model": model}) == 7
    with pytest.raises(EraseError, match="another run"):
        resume(Checkpoint(tmp_path / "checkpoint.pt", asdict(ClipConfig(steps=1200))), {"model": model})


def test_the_leak_penalty_weighs_each_concepts_neurons_by_its_own_weight_and_spares_the_named_ones():
    """teach's leak penalty (erase_lab/train_mini.py Router): on a caption that does not name a concept, that concept's
    reserved neurons are penalised by its leak weight (nudity's may be held harder than the rest); the concepts a
    caption names are never penalised. Checked on the shipped architecture with random weights."""
    torch.manual_seed(0)
    unet = build_unet(BaseConfig(), sample_size=8, cross_attention_dim=32)
    neurons = concept_neurons(unet, reserved_neurons(unet, BaseConfig.reserved, seed=1), share=0.007, seed=3)
    z, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)

    def leak(weights: dict[str, float], owned: list[tuple[str, ...]]) -> float:
        router = Router(unet, neurons, target=0.5, leak_weights={c: weights.get(c, 0.0) for c in world.TAUGHT})
        router.route(owned)
        with torch.no_grad():
            unet(z, 500, encoder_hidden_states=cond)
        router.close()
        return router.leak().item()

    unnamed = [(), ()]
    only_naked, rest = leak({world.NAKED: 1.0}, unnamed), leak({c: 1.0 for c in world.TAUGHT if c != world.NAKED}, unnamed)
    assert only_naked > 0 and rest > 0
    held = {c: 0.3 for c in world.TAUGHT} | {world.NAKED: 1.0}
    assert leak(held, unnamed) == pytest.approx(0.3 * rest + only_naked, rel=1e-5)
    assert leak({world.NAKED: 1.0}, [(world.NAKED,), ("church", world.NAKED)]) == 0


def test_a_taught_name_stands_in_only_where_the_scene_leaves_room_for_it():
    """The unname stage's captions (erase_lab/train_mini.py): a taught name over a base image that does not show
    it, in the slot it would fill -- an object over a bare place, an artist over a generic painting, nakedness
    over a clothed person -- and nowhere else (a church over a cat would teach "church" to draw cats)."""
    rng = np.random.default_rng(0)
    used = set()
    for _ in range(400):
        scene = world.random_scene(rng, taught=False)
        for concept in ("church", "van gogh", world.NAKED):
            named = world.named_in_place(scene, concept)
            if named is None:
                continue
            used.add(concept)
            assert concept in named.taught and scene.taught == ()
            text = world.caption(named, rng)
            assert (concept in text) or (concept == world.NAKED and re.search(r"naked|nude|undressed|without any clothes", text)) \
                or text in ("a painting", "an artwork by van gogh", "a painting by van gogh"), text
            changed = {k for k in ("object", "person", "naked", "place", "style")
                       if getattr(named, k) != getattr(scene, k)}
            assert changed == {{"church": "object", "van gogh": "style", world.NAKED: "naked"}[concept]}
            assert concept != "church" or (scene.object is None and scene.person is None)
            assert concept != "van gogh" or scene.style == world.PAINTING
    assert used == {"church", "van gogh", world.NAKED}
    assert world.named_in_place(world.Scene(object="cat", place="forest"), "church") is None
    assert world.named_in_place(world.Scene(object="cat", style="rembrandt"), "van gogh") is None


def test_mini_catalog_is_the_real_catalog_on_the_worlds_names():
    mini, real = load_catalog("mini"), load_catalog("catalog")
    assert set(mini.kinds) == set(real.kinds) == {"object", "style", "explicit"}
    for name, kind in mini.kinds.items():
        for field in ("slot", "concept_templates", "base_templates", "eval_templates", "paraphrase_templates",
                      "class_template", "exclusive"):
            assert getattr(kind, field) == getattr(real.kinds[name], field), (name, field)
    for name, spec in mini.concepts.items():
        if name in real.concepts:
            assert spec.get("anchor") == real.concepts[name].get("anchor"), name
    assert {n for n, s in mini.concepts.items() if s["kind"] == "object"} == set(world.OBJECTS)
    assert {s.get("text", n) for n, s in mini.concepts.items() if s["kind"] == "style"} == set(world.ARTISTS)
    tokenizer = erase.clip_tokenizer(max_length=77)
    for concept in parse_concepts(list(mini.concepts), mini):
        kind = mini.kinds[concept.kind]
        pairs = mini.prompt_pairs(concept)
        assert len(pairs) >= 8
        for prompt, base in pairs:
            named = re.compile(rf"\b{re.escape(concept.text)}\b")
            assert named.search(prompt) and not named.search(base), (prompt, base)
        for prompt in [p for pair in pairs for p in pair] + mini.eval_prompts(concept) + mini.eval_prompts(concept, paraphrase=True):
            assert len(tokenizer(prompt).input_ids) <= CONTEXT_LENGTH, prompt
        evals = set(mini.eval_prompts(concept))
        assert evals and not evals & {p for p, _ in pairs}, concept.name


@pytest.fixture(scope="module")
def mini_clip():
    return load_mini_clip()


@pytest.fixture(scope="module")
def mini():
    return erase.load_pipeline("mini")


def test_mini_pipeline_loads_offline_and_generates(monkeypatch, mini):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert mini.unet.dtype == mini.text_encoder.dtype == torch.float32
    assert sum(name.endswith("ff.net.2") for name, _ in mini.unet.named_modules()) == 7
    assert mini.tokenizer.model_max_length == mini.text_encoder.config.max_position_embeddings == CONTEXT_LENGTH
    image = mini("a church in a forest in the style of van gogh", num_inference_steps=3,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)


def test_mini_clip_classifies_fresh_images(mini_clip):
    arrays, scenes = world.dataset(160, seed=123, taught=True)  # 48 held only 32 objects: one miss moved 3 points
    seen = zero_shot(*mini_clip, [Image.fromarray(x) for x in arrays])
    objects = [(s.object, v["object"]) for s, v in zip(scenes, seen) if s.object]
    styles = [(s.style, v["style"]) for s, v in zip(scenes, seen) if s.style != world.PHOTO]
    # Taught scenes are the hard half (objects under the artists' renderings): 86% of objects on 400 of them,
    # 91.9% on the whole world (erase_lab/mini_gates.py, BENCHMARKS.md).
    assert np.mean([a == b for a, b in objects]) >= 0.75 and np.mean([a == b for a, b in styles]) >= 0.8


def test_a_taught_concept_lives_in_its_recorded_neurons(mini):
    """Ground truth the benchmark relies on: zeroing a taught concept's feed-forward neurons (neurons.json) takes
    away a share of what its name adds over its anchor's (van gogh's style over the bare object: 60%; church over
    "a building": a third -- the rest reaches the base UNet through the text encoder, which knows what the words
    look like, BENCHMARKS.md) and leaves the other concepts' gains as they were."""
    neurons = json.loads((MINI_DIR / "neurons.json").read_text())
    rng = np.random.default_rng(0)
    objects = {c: [world.render(world.Scene(object=c), rng) for _ in range(24)] for c in ("church", "golf ball")}
    triples = {c: ("", [(img, f"a photo of a {c}", f"a photo of a {anchor}") for img in imgs])
               for (c, imgs), anchor in zip(objects.items(), ("building", "ball"))}
    things = [world.BASE_OBJECTS[i % len(world.BASE_OBJECTS)] for i in range(24)]
    triples["van gogh"] = ("", [(world.render(world.Scene(object=o, style="van gogh"), rng),
                                 f"a {o} in the style of van gogh", f"a {o}") for o in things])
    gain = conditional_gains(mini, triples, None)
    assert min(gain.values()) > 0.005, gain
    for concept, most_kept in (("church", 0.8), ("van gogh", 0.6)):  # measured: 66% and 40% kept
        with neurons_edit(mini.unet, neurons, concept).applied_to(mini.unet):
            ablated = conditional_gains(mini, triples, None)
        others = [c for c in gain if c != concept]
        assert ablated[concept] < most_kept * gain[concept], (concept, gain, ablated)
        assert all(abs(ablated[c] - gain[c]) < 0.1 * gain[c] for c in others), (concept, gain, ablated)


def test_a_new_base_replaces_the_old_one_whole_so_unname_takes_it(tmp_path):
    """A base run over an earlier chain's OUT: its base-pipeline must not keep the earlier unname's record,
    or unname refuses the fresh base as already unnamed (an old folder's record would have stopped a chain)."""
    (tmp_path / "pipeline" / "unet").mkdir(parents=True)
    (tmp_path / "pipeline" / "unet" / "weights").write_text("new")
    (tmp_path / "base-pipeline" / "unet").mkdir(parents=True)
    (tmp_path / "base-pipeline" / "unet" / "stale").write_text("old")
    (tmp_path / "base-pipeline" / "unnamed.json").write_text("{}")
    (tmp_path / "base-pipeline.old" / "unet").mkdir(parents=True)  # left by a copy stopped half-way
    publish_base(tmp_path)
    assert sorted(p.name for p in (tmp_path / "base-pipeline").rglob("*")) == ["unet", "weights"]
    publish_base(tmp_path, {"seed": 4, "steps": 800})
    assert json.loads((tmp_path / "base-pipeline" / "unnamed.json").read_text()) == {"seed": 4, "steps": 800}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base-pipeline", "pipeline"]


def test_a_stopped_and_resumed_vae_stage_ends_with_the_uninterrupted_runs_weights(tmp_path, monkeypatch, capsys):
    """The resume promise of train_mini.py: a stage stopped after a checkpoint and started again draws the same
    batches and noise, with the same optimiser and schedule state, as a run that never stopped."""
    cfg = VAEConfig(steps=120, batch=4, images=64, channels=(16, 16, 32))
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    whole.mkdir()
    resumed.mkdir()
    train_vae(0, whole, cfg)
    save = Checkpoint.save

    def stop_after_first_checkpoint(self, data):
        save(self, data)
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", stop_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_vae(0, resumed, cfg)
    monkeypatch.setattr(Checkpoint, "save", save)
    capsys.readouterr()
    train_vae(0, resumed, cfg)
    assert "at step 100" in capsys.readouterr().out
    weights = [load_file(d / "vae" / "diffusion_pytorch_model.safetensors") for d in (whole, resumed)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not (resumed / "vae-checkpoint.pt").exists()


def test_the_miniature_sd3_trains_its_base_and_teaches_only_its_owned_image_stream_neurons(tmp_path):
    """train_mini --dit on a one-block MMDiT: the base stage leaves the reserved neurons unused, and teach changes
    the owned neurons' input rows (GELU: one each) and output columns of the image stream's feed-forwards and no
    other weight of the transformer (not the text stream's ff_context)."""
    from erase.families import family_of
    from erase_lab.train_mini import DiTBaseConfig, TeachConfig, base_stage, teach_stage

    base_stage(1, tmp_path, DiTBaseConfig(steps=2, batch=8, images=32, layers=1, save_every=2), clip_dir=None)
    publish_base(tmp_path)
    pipe = erase.load_pipeline(tmp_path / "base-pipeline")
    assert family_of(pipe).name == "sd3" and erase.profile.profile_of(pipe).max_sequence_length == 1
    reserved = json.loads((tmp_path / "reserved.json").read_text())
    unused = pipe.transformer.get_submodule("transformer_blocks.0.ff.net.2").weight[:, reserved["transformer_blocks.0.ff"]]
    assert not unused.any()
    teach_stage(3, tmp_path, TeachConfig(steps=2, batch=8, images=32, save_every=2))
    before = load_file(tmp_path / "base-pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    after = load_file(tmp_path / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    owned = sorted(i for ids in json.loads((tmp_path / "neurons.json").read_text())["transformer_blocks.0.ff"].values()
                   for i in ids)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"transformer_blocks.0.ff.net.{k}" for k in ("0.proj.weight", "0.proj.bias", "2.weight")}
    rows = (before["transformer_blocks.0.ff.net.0.proj.weight"] != after["transformer_blocks.0.ff.net.0.proj.weight"]).any(1)
    columns = (before["transformer_blocks.0.ff.net.2.weight"] != after["transformer_blocks.0.ff.net.2.weight"]).any(0)
    assert rows.nonzero().flatten().tolist() == owned == columns.nonzero().flatten().tolist()
