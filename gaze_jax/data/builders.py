"""TFDS builders that generate their data locally, written as ``array_record``.

Datasets (all share one schema, ``common_features``):

* ``gaze_shapes``: shapes at known grid cells, templated questions that need one or two regions.
* ``digit_grid``: scikit-learn's handwritten 8x8 digits on an ``n x n`` grid; splits are made by
  source digit image, so no digit image appears in two splits.
* ``gaze_video``: short clips of shapes that appear, move and change colour; questions about one
  frame's region.
* ``llava_json``: a LLaVA-format conversation JSON and an image folder.

Schema (one example): ``id`` text; ``images`` a sequence of RGB images (the frames when
``is_video``); ``turns`` a sequence of ``{question, answer}`` texts (``<image>`` markers allowed
in questions); ``boxes`` float32 ``[n, 4]`` pixel boxes ``(x0, y0, x1, y1)`` (exclusive ends,
original image size) of what the answer depends on, ``box_image`` int32 ``[n]`` the image / frame
of each; ``object_boxes`` / ``object_box_image`` the same for every object in view (what a
question-blind "salience" pick could choose; empty where unknown, as for ``llava_json``);
``question_type`` text; ``source`` int64 ``[k]`` ids of the source material.

Usage::

  builder = prepare("gaze_shapes", data_dir, config="tiny")        # builds once, then reuses
  src = builder.as_data_source("train")                            # random access, no TF

``prepare(name, data_dir, config, **overrides)`` changes fields of a named config (for example
``image_size=192, num_train=100``); the result gets its own config name (with a hash of the
overrides) so differently generated data never share a directory. Example ``i`` of a split is
generated from ``np.random.default_rng([seed, scene_id])`` with ``scene_id = (split_code << 40)
+ i``: the same config gives the same bytes, and no scene seed is shared between splits.

A prepared folder with a missing or damaged file (its info files, checked here; its
array_record files, checked by ``pipeline.data_source``) raises ``DamagedDatasetError`` naming
the file and how to rebuild it.

``data_dir`` may be ``gs://bucket/...``. array_record (0.8.6) reads and writes local files only
(its C++ writer fails with "open() failed" on a ``gs://`` path, and its reader did not return
on one), so tfds cannot build or read the dataset there. Such a dataset lives in a local mirror,
``local_data_dir(data_dir)`` (under ``$GAZE_JAX_DATA_CACHE``, default
``~/.cache/gaze_jax/datasets``): ``prepare`` copies a prepared dataset down from the bucket, or
builds it in the mirror and copies it up; ``builder`` copies it down; each copy is logged. A
mirror holding the same files (names and sizes) as the bucket is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from gaze_jax import paths
from gaze_jax.data import llava, scenes

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_SPLIT_CODE = {"train": 0, "validation": 1, "test": 2}
_VERSION = tfds.core.Version("1.1.0")   # 1.1.0: object_boxes


def common_features(image_shape=(None, None, 3), image_format: str = "png"):
  """The FeaturesDict every builder writes (see the module docstring)."""
  f = tfds.features
  return f.FeaturesDict({
      "id": f.Text(),
      "images": f.Sequence(f.Image(shape=tuple(image_shape), encoding_format=image_format)),
      "is_video": f.Tensor(shape=(), dtype=np.bool_),
      "turns": f.Sequence({"question": f.Text(), "answer": f.Text()}),
      "boxes": f.Tensor(shape=(None, 4), dtype=np.float32),
      "box_image": f.Tensor(shape=(None,), dtype=np.int32),
      "object_boxes": f.Tensor(shape=(None, 4), dtype=np.float32),
      "object_box_image": f.Tensor(shape=(None,), dtype=np.int32),
      "question_type": f.Text(),
      "source": f.Tensor(shape=(None,), dtype=np.int64),
  })


def _scene_id(split: str, index: int) -> int:
  """Distinct per split by construction: split code in the high bits."""
  return (_SPLIT_CODE[split] << 40) + index


def _split_counts(cfg) -> dict[str, int]:
  counts = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}
  for s, n in counts.items():
    if n < 0:
      raise ValueError(f"{cfg.name}: num_{s} must be >= 0, got {n}")
  return {s: n for s, n in counts.items() if n > 0}


# --------------------------------------------------------------------------- gaze_shapes

@dataclasses.dataclass(kw_only=True)
class DrawnConfig(tfds.core.BuilderConfig):
  """The fields of every generated dataset: ``image_size`` px square images, the size of each
  split, and the ``seed`` that the examples are drawn from."""
  image_size: int = 64
  num_train: int = 20_000
  num_validation: int = 1_000
  num_test: int = 1_000
  seed: int = 0


@dataclasses.dataclass(kw_only=True)
class GazeShapesConfig(DrawnConfig):
  """image_size px square images with a ``grid x grid`` cell grid, ``min..max`` objects; each
  question's type is drawn from ``question_types`` (see ``scenes.SHAPES_QUESTION_TYPES``)."""
  grid: int = 4
  min_objects: int = 3
  max_objects: int = 8
  question_types: tuple[str, ...] = scenes.SHAPES_DEFAULT_QUESTION_TYPES


class _DrawnScenes:
  """Shared by the drawn datasets: square ``image_size`` px images; example i of a split is
  scene ``_scene_id(split, i)``, drawn from ``rng([seed, scene])`` (deterministic, and no
  scene appears in two splits). Subclasses give ``_object_limit`` and ``_draw``."""

  def _info(self):
    s = self.builder_config.image_size
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=common_features((s, s, 3)))

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    limit, what = self._object_limit(cfg)
    if not 1 <= cfg.min_objects <= cfg.max_objects <= limit:
      raise ValueError(f"{cfg.name}: need 1 <= min_objects <= max_objects <= {what}, got "
                       f"{cfg.min_objects}, {cfg.max_objects}")
    return {s: self._generate_examples(s, n) for s, n in _split_counts(cfg).items()}

  def _generate_examples(self, split, n):
    cfg = self.builder_config
    for i in range(n):
      scene = _scene_id(split, i)
      ex = self._draw(np.random.default_rng([cfg.seed, scene]), cfg,
                      example_id=f"{split}-{i:07d}", source=scene)
      yield ex["id"], ex


class GazeShapes(_DrawnScenes, tfds.core.GeneratorBasedBuilder):
  """Procedural shapes with templated questions that need one or two specific regions."""
  VERSION = tfds.core.Version("1.3.0")
  RELEASE_NOTES = {"1.0.0": "colour, size, relation and count questions",
                   "1.1.0": "colour_at / shape_at questions; question_types config field",
                   "1.2.0": "object_boxes",
                   "1.3.0": "where questions (the cell of the one shape of a colour)"}
  BUILDER_CONFIGS = [
      GazeShapesConfig(name="tiny", num_train=32, num_validation=8, num_test=8),
      GazeShapesConfig(name="64px", image_size=64),
      GazeShapesConfig(name="192px", image_size=192),
      GazeShapesConfig(name="384px", image_size=384),
  ]

  def _object_limit(self, cfg):
    return cfg.grid ** 2, f"grid^2 = {cfg.grid ** 2}"

  def _split_generators(self, dl_manager):
    scenes.check_question_types(self.builder_config.question_types)     # before any example
    return super()._split_generators(dl_manager)

  def _draw(self, rng, cfg, **ids):
    return scenes.shapes_example(rng, image_size=cfg.image_size, grid=cfg.grid,
                                 min_objects=cfg.min_objects, max_objects=cfg.max_objects,
                                 question_types=tuple(cfg.question_types), **ids)


# --------------------------------------------------------------------------- digit_grid

@dataclasses.dataclass(kw_only=True)
class DigitGridConfig(DrawnConfig):
  """``n x n`` digits on an image_size px image; ``validation_fraction`` / ``test_fraction`` of
  the 1797 source digit images are reserved for those splits (partition drawn with ``seed``);
  each question's type is drawn from ``question_types`` (``scenes.DIGIT_QUESTION_TYPES``)."""
  n: int = 4
  question_types: tuple[str, ...] = scenes.DIGIT_QUESTION_TYPES
  validation_fraction: float = 0.1
  test_fraction: float = 0.1


def digit_source_pools(seed: int, validation_fraction: float, test_fraction: float,
                       n_images: int) -> dict[str, np.ndarray]:
  """Disjoint index sets of the source digit images for each split."""
  if not (0 < validation_fraction and 0 < test_fraction
          and validation_fraction + test_fraction < 1):
    raise ValueError("validation_fraction and test_fraction must be > 0 with a sum < 1, got "
                     f"{validation_fraction}, {test_fraction}")
  perm = np.random.default_rng([seed, 12345]).permutation(n_images)
  n_val = max(1, int(round(validation_fraction * n_images)))
  n_test = max(1, int(round(test_fraction * n_images)))
  return {"validation": np.sort(perm[:n_val]), "test": np.sort(perm[n_val:n_val + n_test]),
          "train": np.sort(perm[n_val + n_test:])}


class DigitGrid(tfds.core.GeneratorBasedBuilder):
  """Real handwritten digits (scikit-learn's ``digits``) on a grid, with questions about a cell,
  a row, or where a digit is."""
  VERSION = _VERSION
  BUILDER_CONFIGS = [
      DigitGridConfig(name="tiny", num_train=32, num_validation=8, num_test=8),
      DigitGridConfig(name="64px", image_size=64),
      DigitGridConfig(name="192px", image_size=192),
      DigitGridConfig(name="384px", image_size=384),
  ]

  def _info(self):
    s = self.builder_config.image_size
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=common_features((s, s, 3)))

  def _split_generators(self, dl_manager):
    # scikit-learn only for this builder; it ships the digits (no download).
    from sklearn.datasets import load_digits

    cfg = self.builder_config
    if cfg.image_size % cfg.n:
      raise ValueError(f"{cfg.name}: image_size={cfg.image_size} must be a multiple of n={cfg.n}")
    scenes.check_question_types(cfg.question_types, scenes.DIGIT_QUESTION_TYPES)
    digits = load_digits()
    pools = digit_source_pools(cfg.seed, cfg.validation_fraction, cfg.test_fraction,
                               len(digits.target))
    return {s: self._generate_examples(s, n, digits.images, digits.target, pools[s])
            for s, n in _split_counts(cfg).items()}

  def _generate_examples(self, split, n, images, labels, pool):
    cfg = self.builder_config
    for i in range(n):
      ex = scenes.digit_grid_example(
          np.random.default_rng([cfg.seed, _scene_id(split, i)]), images=images, labels=labels,
          pool=pool, image_size=cfg.image_size, n=cfg.n, example_id=f"{split}-{i:07d}",
          question_types=tuple(cfg.question_types))
      yield ex["id"], ex


# --------------------------------------------------------------------------- gaze_video

@dataclasses.dataclass(kw_only=True)
class GazeVideoConfig(DrawnConfig):
  """Clips of ``frames`` frames of image_size px with ``min..max`` moving shapes; with
  ``min_frames`` (default None: ``frames``) each clip's length is drawn in ``[min_frames,
  frames]``. Each question's type is drawn from ``question_types`` (default
  ``scenes.VIDEO_DEFAULT_QUESTION_TYPES``; any of ``scenes.VIDEO_QUESTION_TYPES``)."""
  frames: int = 8
  min_frames: Optional[int] = None
  min_objects: int = 2
  max_objects: int = 4
  question_types: tuple[str, ...] = scenes.VIDEO_DEFAULT_QUESTION_TYPES
  num_train: int = 10_000         # clips are 8 images each: fewer of them by default
  num_validation: int = 500
  num_test: int = 500


class GazeVideo(_DrawnScenes, tfds.core.GeneratorBasedBuilder):
  """Short clips of shapes that appear, move and change colour; each question needs the right
  frame's region."""
  VERSION = _VERSION
  BUILDER_CONFIGS = [
      GazeVideoConfig(name="tiny", frames=4, max_objects=3, num_train=16, num_validation=4,
                      num_test=4),
      GazeVideoConfig(name="64px", image_size=64),
      GazeVideoConfig(name="192px", image_size=192),
  ]

  def _object_limit(self, cfg):
    # Every object appears at a frame of its own, so the shortest clip bounds them.
    shortest = cfg.frames if cfg.min_frames is None else cfg.min_frames
    limit = min(shortest, len(scenes.SHAPES))
    return limit, f"min(min_frames or frames, {len(scenes.SHAPES)}) = {limit}"

  def _split_generators(self, dl_manager):
    cfg = self.builder_config                                          # before any example
    scenes.check_question_types(cfg.question_types, scenes.VIDEO_QUESTION_TYPES)
    if cfg.min_frames is not None and not 2 <= cfg.min_frames <= cfg.frames:
      raise ValueError(f"{cfg.name}: need 2 <= min_frames <= frames={cfg.frames}, got "
                       f"min_frames={cfg.min_frames}")
    return super()._split_generators(dl_manager)

  def _draw(self, rng, cfg, **ids):
    return scenes.video_example(rng, image_size=cfg.image_size, frames=cfg.frames,
                                min_frames=cfg.min_frames, min_objects=cfg.min_objects,
                                max_objects=cfg.max_objects,
                                question_types=tuple(cfg.question_types), **ids)


# --------------------------------------------------------------------------- llava_json

@dataclasses.dataclass(kw_only=True)
class LlavaJsonConfig(tfds.core.BuilderConfig):
  """``json_files`` maps a split name to a LLaVA JSON file; image paths in it are relative to
  ``image_dir``. ``skip_bad`` skips (and counts) bad records instead of raising."""
  json_files: dict = dataclasses.field(default_factory=dict)
  image_dir: str = ""
  skip_bad: bool = False
  image_format: str = "png"


class LlavaJson(tfds.core.GeneratorBasedBuilder):
  """LLaVA-format conversations (several turns, several images per example) from a local JSON
  file and image folder. Skipped records are listed in ``info.metadata["skipped"]``."""
  VERSION = _VERSION
  BUILDER_CONFIGS = []

  def _info(self):
    cfg = self.builder_config
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=common_features((None, None, 3), cfg.image_format),
                                 metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if not cfg.json_files:
      raise ValueError(f"{cfg.name}: LlavaJsonConfig.json_files is empty; give "
                       "{'train': 'path/to/file.json', ...}")
    gens, skipped = {}, {}
    for split, path in cfg.json_files.items():
      records, bad = llava.parse_json(path, cfg.image_dir, skip_bad=cfg.skip_bad)
      if not records:              # fail before any split is written
        raise _no_examples(path, split, bad)
      skipped[split] = bad
      gens[split] = self._generate_examples(records, path, split, bad)
    # The lists are filled further while generating (decode failures), before info is written.
    self.info.metadata["skipped"] = skipped
    n = sum(len(b) for b in skipped.values())
    if n:
      logging.warning("llava_json %s: skipped %d bad records: %s", cfg.name, n,
                      [b["reason"] for bs in skipped.values() for b in bs][:5])
    return gens

  def _generate_examples(self, records, path, split: str, bad: list):
    cfg = self.builder_config
    seen = set()
    for rec in records:
      try:
        ex = llava.record_example(rec, path)
      except llava.LlavaRecordError as e:     # decodes fail only here (verify() is shallow)
        if not cfg.skip_bad:
          raise
        bad.append({"id": rec.id, "index": rec.index, "reason": str(e)})
        continue
      key = f"{rec.index:09d}"                # ids need not be unique in LLaVA files
      if key in seen:
        raise ValueError(f"{path}: duplicate record index {rec.index}")
      seen.add(key)
      yield key, ex
    if not seen:                   # every image failed to decode: tfds would only assert
      raise _no_examples(path, split, bad)


def _no_examples(path, split: str, bad: list) -> llava.LlavaRecordError:
  why = (f"all {len(bad)} of its records were skipped as bad (the first: {bad[0]['reason']})"
         if bad else "it holds no records")
  return llava.LlavaRecordError(f"{path}: split {split!r} has no examples: {why}; give it "
                                "good records or leave the split out of json_files")


# --------------------------------------------------------------------------- helpers

BUILDERS = {"gaze_shapes": GazeShapes, "digit_grid": DigitGrid, "gaze_video": GazeVideo,
            "llava_json": LlavaJson}


def make_config(name: str, config: Union[str, tfds.core.BuilderConfig, None] = "tiny", *,
                config_name: Optional[str] = None, **overrides) -> tfds.core.BuilderConfig:
  """A builder config: a named preset (or a config object) with ``overrides`` applied.

  With overrides the config is renamed ``config_name`` or ``<base>-<hash of the overrides>``,
  so that its data get their own directory. ``llava_json`` has no presets: pass
  ``json_files=`` and ``image_dir=``; its name also carries a hash of its sources
  (``llava_source_fingerprint``: the JSON files' bytes, and the size and modification time of
  each image they name), so editing either prepares the data again.
  """
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(BUILDERS)}")
  cls = BUILDERS[name]
  if isinstance(config, tfds.core.BuilderConfig):
    base = config
  elif name == "llava_json" and config in (None, "tiny"):
    base = LlavaJsonConfig(name="custom")
  else:
    presets = {c.name: c for c in cls.BUILDER_CONFIGS}
    if config not in presets:
      raise ValueError(f"{name}: unknown config {config!r}; presets: {sorted(presets)}")
    base = presets[config]
  if not overrides:
    return base if config_name is None else dataclasses.replace(base, name=config_name)
  fields = {f.name for f in dataclasses.fields(base)}
  unknown = sorted(set(overrides) - (fields - {"name"}))
  if unknown:
    raise ValueError(f"{name}: unknown config fields {unknown}; known: {sorted(fields)}")
  cfg = dataclasses.replace(base, **overrides)
  # Keyed by the JSON form of each value: a run's config.json gives tuples back as lists, and
  # the same overrides must name the same prepared folder (eval_main rebuilds from it).
  keyed = {k: str(_json_form(v)) for k, v in overrides.items()}
  if name == "llava_json":
    # Its examples come from files, not from the overrides: key the folder by their contents
    # too, so that an edited JSON or a replaced image is prepared again, not reused stale.
    keyed["_source"] = llava_source_fingerprint(cfg.json_files, cfg.image_dir)
  blob = hashlib.sha1(json.dumps(dict(sorted(keyed.items()))).encode()).hexdigest()[:10]
  if config_name is None:
    new_name = f"{base.name}-{blob}"
  else:
    new_name = f"{config_name}-{blob[:6]}" if name == "llava_json" else config_name
  return dataclasses.replace(cfg, name=new_name)


def _json_form(value):
  """``value`` as JSON gives it back: tuples as lists, mappings as dicts, recursively."""
  if isinstance(value, (tuple, list)):
    return [_json_form(v) for v in value]
  if isinstance(value, Mapping):
    return {k: _json_form(v) for k, v in value.items()}
  return value


def llava_source_fingerprint(json_files: dict, image_dir) -> str:
  """A hash of what a llava_json dataset is built from: the bytes of each split's JSON file and
  the size and modification time of every image file its records name (read, not decoded).
  A missing file counts as missing, so the parse of the prepare step reports it."""
  h = hashlib.sha1()
  for split, path in sorted(json_files.items()):
    path = Path(path)
    raw = path.read_bytes() if path.is_file() else b"<missing>"
    h.update(f"{split}\0{path}\0".encode() + hashlib.sha1(raw).digest())
    try:
      records = json.loads(raw)
    except ValueError:
      continue                     # parse_json names the bad file when the data are prepared
    for rec in records if isinstance(records, list) else []:
      image = rec.get("image", []) if isinstance(rec, dict) else []
      for n in [image] if isinstance(image, str) else image if isinstance(image, list) else []:
        p = Path(image_dir) / str(n)
        st = p.stat() if p.is_file() else None
        h.update(f"{n}\0{st.st_size if st else -1}\0{st.st_mtime_ns if st else -1}\0".encode())
  return h.hexdigest()


CACHE_ENV = "GAZE_JAX_DATA_CACHE"
# tfds reads a dataset folder as prepared once this file is there: copied last.
_INFO_FILE = "dataset_info.json"


def local_data_dir(data_dir) -> epath.Path:
  """The local folder tfds reads ``data_dir`` in: ``data_dir`` itself when local; for
  ``gs://bucket/x`` the mirror ``<cache>/gs/bucket/x``, ``<cache>`` being
  ``$GAZE_JAX_DATA_CACHE`` (default ``~/.cache/gaze_jax/datasets``)."""
  if paths.is_local(data_dir):
    return epath.Path(data_dir)
  scheme, rest = os.fspath(data_dir).split("://", 1)
  cache = os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/gaze_jax/datasets")
  return paths.absolute(cache) / scheme / rest.strip("/")


def _file_sizes(folder) -> dict[str, int]:
  folder = epath.Path(folder)
  return {p.relative_to(folder).as_posix(): p.stat().length for p in paths.list_files(folder)}


def _copy_dataset(src, dst) -> bool:
  """Copies the prepared dataset folder ``src`` to ``dst`` (one local, one ``gs://``) unless
  ``dst`` holds the same files (names and sizes). ``dst`` reads as prepared only once complete:
  a local copy is made beside it (one folder per process: the processes of a host may copy at
  once) and renamed into place unless another process's copy got there first; in a bucket its
  ``dataset_info.json`` is deleted first and written last. Returns whether it copied."""
  src, dst = epath.Path(src), epath.Path(dst)
  files = _file_sizes(src)
  if not files or _file_sizes(dst) == files:
    return False
  local = paths.is_local(dst)
  target = dst.with_name(f"{dst.name}.incomplete-{os.getpid()}") if local else dst
  if local:
    target.rmtree(missing_ok=True)
  else:
    (dst / _INFO_FILE).unlink(missing_ok=True)
  for rel in sorted(files, key=lambda rel: rel == _INFO_FILE):
    (target / rel).parent.mkdir(parents=True, exist_ok=True)
    (src / rel).copy(target / rel, overwrite=True)
  if local:
    if _file_sizes(dst) == files:
      target.rmtree()
    else:
      dst.rmtree(missing_ok=True)
      target.rename(dst)
  return True


def _mirror(local: epath.Path, data_dir, *, down: bool) -> bool:
  """Copies the dataset folder ``local`` between the bucket ``data_dir`` and its local mirror:
  ``down`` when the bucket holds it prepared, else up (a prepared local one). Returns whether it
  copied."""
  remote = epath.Path(data_dir) / local.relative_to(local_data_dir(data_dir))
  src, dst = (remote, local) if down else (local, remote)
  if down and not (remote / _INFO_FILE).exists():
    return False
  copied = _copy_dataset(src, dst)
  if copied:
    log.info("dataset %s copied to %s (array_record reads and writes local files only; "
             "local mirrors of gs:// datasets go under $%s)", src, dst, CACHE_ENV)
  return copied


def builder(name: str, data_dir, config: Union[str, tfds.core.BuilderConfig, None] = "tiny",
            **overrides) -> tfds.core.DatasetBuilder:
  """The builder (not prepared) for ``name`` under ``data_dir``; for a ``gs://`` data_dir it
  reads the local mirror, copied down first when the bucket holds the prepared dataset."""
  cfg = make_config(name, config, **overrides)
  cls = BUILDERS[name]
  folder = local_data_dir(data_dir) / name / cfg.name / str(cls.VERSION)   # tfds' layout
  if not paths.is_local(data_dir):
    _mirror(folder, data_dir, down=True)
  # tfds reuses any folder there (prepare would not rebuild it) and reads its info files as it
  # makes the builder, with errors that name neither.
  _check_info_files(folder)
  try:
    return cls(config=cfg, data_dir=str(local_data_dir(data_dir)), file_format="array_record")
  except Exception as e:
    if not folder.exists():
      raise
    raise DamagedDatasetError(f"the dataset folder {folder} cannot be read ({type(e).__name__}: "
                              f"{e}); {rebuild_hint(folder)}") from e


def prepare(name: str, data_dir, config: Union[str, tfds.core.BuilderConfig, None] = "tiny",
            **overrides) -> tfds.core.DatasetBuilder:
  """Generates the dataset (once; a prepared one is reused) and returns its builder. For a
  ``gs://`` data_dir: reused from the bucket (through the local mirror) when it is there, else
  generated in the mirror and copied to the bucket."""
  b = builder(name, data_dir, config, **overrides)
  b.download_and_prepare(file_format="array_record")
  if not paths.is_local(data_dir):
    _mirror(data_dir_of(b), data_dir, down=False)
  return b


class DamagedDatasetError(ValueError):
  """A prepared dataset's file is missing, truncated or corrupt."""


def rebuild_hint(folder) -> str:
  return f"delete the folder {folder} and run again: prepare builds the dataset anew"


def _check_info_files(folder: epath.Path) -> None:
  """Raises DamagedDatasetError when the dataset folder exists but its info files do not, or
  are not JSON (a truncated copy)."""
  if not folder.exists():
    return
  for f in (folder / _INFO_FILE, folder / "features.json"):
    if not f.exists():
      raise DamagedDatasetError(f"{f} is missing, so the dataset in {folder} cannot be read; "
                                f"{rebuild_hint(folder)}")
    try:
      json.loads(f.read_text())
    except ValueError as e:          # JSONDecodeError and UnicodeDecodeError
      raise DamagedDatasetError(f"{f} is damaged ({e}); {rebuild_hint(folder)}") from None


def check_shards(file_instructions, folder) -> None:
  """Raises DamagedDatasetError when a shard file of ``file_instructions`` (tfds'
  ``FileInstruction``s of a split) is missing or holds another number of records than
  dataset_info.json says (read from the file's footer: a truncated file)."""
  # array_record (native, optional for tfds) only for this check: not at the module's top.
  from array_record.python import array_record_module

  for fi in file_instructions:
    path = epath.Path(fi.filename)
    if not path.exists():
      raise DamagedDatasetError(f"{path} is missing; {rebuild_hint(folder)}")
    try:
      reader = array_record_module.ArrayRecordReader(str(path))
      n = reader.num_records()
      reader.close()
    except Exception as e:           # RuntimeError from the C++ reader
      raise DamagedDatasetError(f"{path} cannot be read ({e}); {rebuild_hint(folder)}") from None
    if n != fi.examples_in_shard:
      raise DamagedDatasetError(f"{path} holds {n} records, its dataset_info.json says "
                                f"{fi.examples_in_shard} (truncated or damaged); "
                                f"{rebuild_hint(folder)}")


def data_dir_of(b: tfds.core.DatasetBuilder) -> epath.Path:
  """The local folder holding this builder's array_record files (a gs:// data_dir's mirror)."""
  return epath.Path(str(b.data_dir))


def skipped_records(b: tfds.core.DatasetBuilder) -> dict[str, list[dict]]:
  """``llava_json``: the skipped records (``{"id", "index", "reason"}``) per split; empty for
  the other datasets, which never skip."""
  md = b.info.metadata
  return {} if md is None else dict(dict(md).get("skipped", {}))
