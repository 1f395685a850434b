"""``stagetrain prepare SRC DST``: resolution tiers of an image folder, written once.

Decoding a 500x375 JPEG costs about the same whether the stage wants 128 or 224 px: draft mode shrinks
the inverse DCT, never the entropy decode of the whole file. So ``prepare`` writes, for each tier ``T``,
a copy of the ImageFolder ``SRC`` whose images' shorter side is capped at ``T`` (FFCV's max-res idea), and
``full/``, the originals; a job that names ``DST`` reads, per stage, the smallest tier that covers it
(``service.tiers``, which documents the layout and the rule).

- An image is decoded once (JPEG draft mode at the largest size it is resized to), resized with Lanczos
  for each tier it is larger than, and written in its own format (JPEG at ``quality``) under the same
  relative name; an image no larger than a tier, and every image in ``full/``, is copied byte for byte
  (re-encoding would lose quality and save no decoding). A file that does not decode stops the prepare
  with one line naming it; with ``on_bad_image="skip"`` (``--on-bad-image skip``) it is named, copied as
  it is into every tier (the tiers keep the source's listing, so ids and labels stay the source's), marked
  in the samples index (size 0 x 0) and listed in the manifest (``bad_images``): a job leaves it out with
  ``data.on_bad_image: skip``, and names it in its error without.
- Commit protocol: ``DST/stagetrain-prepare.json`` (the arguments) first, then the images, each written
  whole (a temporary name renamed, locally; one PUT on object stores), with the finished ones appended to
  ``DST/stagetrain-prepare.jsonl`` about once a second; then every tier's listing is checked against the
  source's (same relative paths and labels, in the same order), then ``stagetrain-samples.jsonl.gz`` and,
  last, ``stagetrain-tiers.json``. A prepare that is stopped at any point continues where it stopped when
  run again with the same arguments (a finished image is one that is in the progress file with the byte
  size the source has now, and whose tier files exist); a ``DST`` prepared from another source, with
  other tiers or quality, or that holds anything else is refused.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Literal

import fsspec
from pydantic import BaseModel, ConfigDict

from checkpoints.storage import Storage, StorageError, access_problem
from service.sources import image_folder_index
from service.tiers import FULL, INTENT, MANIFEST, SAMPLES, TiersManifest, capped_size

PROGRESS = "stagetrain-prepare.jsonl"
# --tiers auto, chosen from bench/tiers.py's figures (README, "Resolution tiers"): with crops on the device
# each sample reads the smallest tier its own box needs (R to 1.95 R at the default crop_scale, 1.4 R for
# the median box), so tiers close together serve 128-224 px stages: 160 (a 128 px stage's median box),
# 192 (a 128 px stage's smaller boxes: without it half of them read 224, 0.31 against 0.18 ms a decode),
# 224 (evaluation at 224 px, a 160 px stage's median box), 288 (a 224 px stage's larger boxes). Against
# 160,224,288 (the default before; 1.16x the source's bytes, this 1.43x): a loader's work 1.08-1.13x /
# 1.03-1.12x / 1.00-1.10x as fast at 128 / 160 / 224 px, evaluation the same. Against 160,256: 1.19x /
# 1.11x / 1.14x more, evaluation at 224 px 1.23x; 160,208,272 is slower at 160 and 224 px (evaluation
# 0.75x); 160,192,256,320 (1.66x) is faster at 224 px training only, slower at evaluating 224 px.
AUTO_TIERS = (160, 192, 224, 288)
MIN_TIER = 16
FLUSH_S = 1.0  # progress is appended at most this often (one object per append on object stores)
PLAIN_EVERY_S = 10.0  # progress lines when the output is not a terminal
# Tests only: seconds each image waits before it is processed, so that a test can kill a prepare midway.
TEST_DELAY_S = float(os.environ.get("STAGETRAIN_TEST_PREPARE_DELAY_S", "0"))


class PrepareArgs(BaseModel):
    """``DST/stagetrain-prepare.json``: what a prepare under way was asked for (a resume must match)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    source: str
    tiers: list[int]
    quality: int


@dataclass(frozen=True)
class Listing:
    """An ImageFolder source as ``image_folder_index`` lists it: sample id = position in ``samples``."""

    url: str
    fs: object
    root: str  # the filesystem path of ``url``
    classes: list[str]
    samples: list[tuple[str, int, int]]  # (path relative to root, label, bytes)

    @property
    def digest(self) -> str:
        h = hashlib.sha256("\n".join(self.classes).encode() + b"\n\n")
        for rel, label, size in self.samples:
            h.update(f"{rel}\t{label}\t{size}\n".encode())
        return h.hexdigest()


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` did."""

    dst: str
    manifest: TiersManifest
    written: int  # images processed by this run
    skipped: int  # images a previous, interrupted run had finished
    already: bool  # DST was prepared already (nothing written)


def parse_tiers(text: str) -> list[int] | None:
    """``--tiers``: comma-separated sizes in px (ascending, distinct), or None for ``auto`` (``prepare``:
    ``AUTO_TIERS`` for a new folder, a prepared or half-prepared folder's own)."""
    if text.strip() == "auto":
        return None
    try:
        tiers = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise ValueError(f"--tiers: expected `auto` or sizes in px such as 160,256; got {text!r}") from None
    if not tiers or tiers[0] < MIN_TIER:
        raise ValueError(f"--tiers: each size must be at least {MIN_TIER} px; got {text!r}")
    return tiers


def normalized_url(url: str) -> str:
    """Local paths absolute, URLs without a trailing slash: the form recorded and compared."""
    return url.rstrip("/") if "://" in url else os.path.abspath(url)


def list_source(src: str) -> Listing:
    """The source's ImageFolder listing with byte sizes, or one line saying why it cannot be read."""
    try:
        fs, classes, paths = image_folder_index(src)
        root = fsspec.core.url_to_fs(src)[1].rstrip("/")
        sizes = {p: info["size"] for p, info in fs.find(root, detail=True).items()}
    except ValueError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"{src}: no such folder") from None
    except Exception as e:  # noqa: BLE001 - credentials, network, permissions: say which and where
        problem = access_problem(e, src)
        if problem is None:
            raise
        raise StorageError(f"cannot read {src}: {problem}") from None
    used = {label for _, label in paths}
    empty = [c for label, c in enumerate(classes) if label not in used]
    if empty:
        raise ValueError(
            f"{src}/{empty[0]}: a class folder without images (an object store keeps no empty folder, so "
            "the tiers could not keep the labels after it); remove it or add its images"
        )
    samples = [(p[len(root) + 1 :], label, sizes[p]) for p, label in paths]
    return Listing(normalized_url(src), fs, root, classes, samples)


def prepare(
    src: str,
    dst: str,
    tiers: list[int] | None,
    quality: int = 90,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    say: Callable[[str], None] | None = None,
    on_bad_image: Literal["error", "skip"] = "error",
) -> Prepared:
    """Write (or finish writing) the tiers of ``src`` into ``dst``; see the module docstring. ``tiers``
    None: ``auto``, the tiers of a prepare of ``dst`` under way or done (one started with an earlier
    default continues as it began), else ``AUTO_TIERS``."""
    out = Storage(normalized_url(dst))
    out.check()
    if tiers is None:
        tiers = _tiers_there(out) or list(AUTO_TIERS)
    tiers = sorted(set(tiers))
    if not tiers or tiers[0] < MIN_TIER:
        raise ValueError(f"--tiers: each size must be at least {MIN_TIER} px; got {tiers}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality: must be between 1 and 100, got {quality}")
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"--on-bad-image: error or skip, got {on_bad_image!r}")
    skip = on_bad_image == "skip"
    say = say or (lambda _: None)
    args = PrepareArgs(source=normalized_url(src), tiers=tiers, quality=quality)
    if normalized_url(dst).startswith(args.source + "/"):
        raise ValueError(f"{dst}: inside the source folder {src}, where its tiers would be read as classes")
    source = list_source(src)
    folders = [str(t) for t in tiers] + [FULL]

    if out.exists(MANIFEST):
        manifest = TiersManifest.model_validate_json(out.read_text(MANIFEST))
        _refuse_other(
            out,
            MANIFEST,
            args,
            PrepareArgs(source=manifest.source, tiers=manifest.tiers, quality=manifest.quality),
        )
        if manifest.source_digest != source.digest:
            raise ValueError(
                f"{out.url}: prepared from an earlier listing of {src} (files were added, removed or "
                f"changed since); delete {out.url} and prepare again"
            )
        return Prepared(out.url, manifest, written=0, skipped=manifest.samples, already=True)
    if out.exists(INTENT):
        _refuse_other(out, INTENT, args, PrepareArgs.model_validate_json(out.read_text(INTENT)))
        done = _finished(out, source, folders, skip)
        say(f"continuing the prepare in {out.url}: {len(done):,} of {len(source.samples):,} images done")
    else:
        if out.listdir():
            raise ValueError(
                f"{out.url}: not empty, and not a stagetrain prepare; prepare into a new or empty folder"
            )
        out.write_text(args.model_dump_json(indent=2), INTENT)
        done = {}

    pending = [(rel, size) for rel, _, size in source.samples if rel not in done]
    total, count = len(source.samples), len(done)
    if progress:
        progress(count, total)
    log, last_flush = [], time.monotonic()

    def finished(entry: dict) -> None:
        nonlocal count, last_flush
        done[entry["path"]] = entry
        log.append(json.dumps(entry))
        if "bad" in entry:
            say(
                f"{source.url}/{entry['path']}: not a readable image ({entry['bad']}); copied as it is "
                "(--on-bad-image skip): jobs leave it out with data.on_bad_image: skip"
            )
        count += 1
        if time.monotonic() - last_flush >= FLUSH_S:
            flush()
        if progress:
            progress(count, total)

    def flush() -> None:
        nonlocal last_flush
        if log:
            out.append_text("\n".join(log) + "\n", PROGRESS)
            log.clear()
        last_flush = time.monotonic()

    try:
        _run_all(pending, lambda item: _tiers_of(source, out, tiers, quality, skip, *item), workers, finished)
    finally:
        flush()

    say("checking every tier's listing against the source")
    again = list_source(src)
    if again.digest != source.digest:
        raise ValueError(f"{src}: changed while it was being prepared; run the same prepare again")
    for folder in folders:
        _check_tier(out, folder, source)
    manifest = _commit(out, args, source, done, folders)
    return Prepared(out.url, manifest, written=len(pending), skipped=total - len(pending), already=False)


def _tiers_there(out: Storage) -> list[int] | None:
    """The tiers of the prepare in ``out`` (done, or under way), if there is one."""
    for name, model in ((MANIFEST, TiersManifest), (INTENT, PrepareArgs)):
        if out.exists(name):
            with contextlib.suppress(ValueError):  # not ours: refused later, with the reason
                return model.model_validate_json(out.read_text(name)).tiers
    return None


def _refuse_other(out: Storage, name: str, asked: PrepareArgs, found: PrepareArgs) -> None:
    for field in ("source", "tiers", "quality"):
        here, wanted = getattr(found, field), getattr(asked, field)
        if here != wanted:
            raise ValueError(
                f"{out.url}/{name}: {field} {here} there, {wanted} asked; a prepared folder is never "
                f"overwritten: prepare into another folder, or delete {out.url} to start over"
            )


def _finished(out: Storage, source: Listing, folders: list[str], skip: bool) -> dict[str, dict]:
    """Images an interrupted prepare finished: in its progress file with the byte size the source has
    now, and with all their tier files there (an unreadable one only if ``skip``: else it is read again,
    and stops the prepare)."""
    try:
        lines = out.read_appended(PROGRESS).splitlines()
    except FileNotFoundError:
        lines = []
    entries = {}
    for line in lines:
        with contextlib.suppress(ValueError):  # a line torn by a kill
            entry = json.loads(line)
            entries[entry["path"]] = entry
    existing = set(out.fs.find(out.root))
    done = {}
    for rel, _, size in source.samples:
        entry = entries.get(rel)
        if entry and entry["bytes"] == size and all(out.path(f, rel) in existing for f in folders):
            if skip or "bad" not in entry:
                done[rel] = entry
    return done


def _run_all(items: list, work: Callable, workers: int | None, on_done: Callable[[dict], None]) -> None:
    """``work(item)`` for every item on a thread pool, at most 4 per thread in flight, ``on_done(result)``
    in this thread as each finishes. The first error stops new work; what is in flight finishes (and is
    passed to ``on_done``) before the error is raised."""
    error, workers = None, workers or min(32, (os.cpu_count() or 1) + 4)
    with ThreadPoolExecutor(workers, thread_name_prefix="prepare") as pool:
        todo, running = iter(items), set()
        while True:
            while error is None and len(running) < 4 * workers:
                item = next(todo, None)
                if item is None:
                    break
                running.add(pool.submit(work, item))
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                if future.exception() is not None:
                    error = error or future.exception()
                else:
                    on_done(future.result())
    if error is not None:
        raise error


def _tiers_of(
    source: Listing, out: Storage, tiers: list[int], quality: int, skip: bool, rel: str, size: int
) -> dict:
    """Read one source image, write its tier files; its progress entry (``bad``: why it is unreadable,
    with ``skip``: its bytes copied into every tier)."""
    from PIL import Image

    if TEST_DELAY_S:
        time.sleep(TEST_DELAY_S)
    url = f"{source.url}/{rel}"
    try:
        data = source.fs.cat_file(f"{source.root}/{rel}")
    except FileNotFoundError:
        raise ValueError(f"{url}: removed while it was being prepared; run the same prepare again") from None
    try:
        img = Image.open(io.BytesIO(data))
        fmt, (width, height) = img.format, img.size
        smaller = [t for t in tiers if t < min(width, height)]
        if smaller:  # decode once, at the largest size needed (JPEG: a reduced DCT scale where it can)
            img.draft(img.mode, capped_size(width, height, smaller[-1]))
        img.load()  # a truncated or corrupt file fails here, before anything of it is written
    except MemoryError:
        raise  # this machine, not the file
    except Image.DecompressionBombError as e:  # a readable image, too large for PIL: not one to skip
        raise ValueError(f"{url}: {e}; take it out of the source or make it smaller") from None
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for bad files
        if not skip:
            raise ValueError(
                f"{url}: not a readable image ({type(e).__name__}: {e}); replace or remove it, or prepare "
                "with --on-bad-image skip"
            ) from None
        for folder in [str(t) for t in tiers] + [FULL]:
            _write(out, data, folder, rel)
        return {
            "path": rel,
            "bytes": size,
            "size": None,
            "tier_bytes": [len(data)] * (len(tiers) + 1),
            "bad": f"{type(e).__name__}: {e}",
        }
    if img.mode not in ("RGB", "RGBA", "L", "LA", "CMYK"):
        img = img.convert("RGB")  # palette and bilevel images resize badly (nearest neighbour only)
    tier_bytes = []
    for folder, tier in [(str(t), t) for t in tiers] + [(FULL, None)]:
        if tier is None or tier >= min(width, height):
            body = data  # as it is: no smaller, and not re-encoded
        else:
            small = img.resize(capped_size(width, height, tier), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            options = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
            if img.info.get("icc_profile"):  # colours as the original's
                options["icc_profile"] = img.info["icc_profile"]
            small.save(buf, format=fmt, **options)
            body = buf.getvalue()
        _write(out, body, folder, rel)
        tier_bytes.append(len(body))
    return {"path": rel, "bytes": size, "size": [width, height], "tier_bytes": tier_bytes}


def _write(out: Storage, body: bytes, folder: str, rel: str) -> None:
    try:
        out.write_bytes(body, folder, rel)
    except OSError as e:
        raise StorageError(f"cannot write {out.url}/{folder}/{rel}: {type(e).__name__}: {e}") from None


def _check_tier(out: Storage, folder: str, source: Listing) -> None:
    """``folder`` holds exactly the source's images (left-overs of an interrupted write or of images
    removed from the source are deleted), and ``image_folder_index`` lists them as it lists the source."""
    expected = {out.path(folder, rel) for rel, _, _ in source.samples}
    extra = [p for p in out.fs.find(out.path(folder)) if p not in expected]
    if extra:
        out.fs.rm(extra)
    _, classes, listed = image_folder_index(out.child(folder).url)
    prefix = len(out.path(folder)) + 1
    got = [(p[prefix:], label) for p, label in listed]
    want = [(rel, label) for rel, label, _ in source.samples]
    if classes != source.classes or got != want:
        have = set(got)
        missing = next((rel for rel, label in want if (rel, label) not in have), None)
        raise ValueError(
            f"{out.url}/{folder}: lists {len(got)} images in {len(classes)} classes, the source "
            f"{len(want)} in {len(source.classes)}"
            + (f" ({missing} is missing)" if missing else "")
            + "; run the same prepare again"
        )


def _commit(
    out: Storage, args: PrepareArgs, source: Listing, done: dict[str, dict], folders: list[str]
) -> TiersManifest:
    """The samples index, then the manifest (the folder counts as prepared from then on), then the
    bookkeeping of the prepare is removed."""
    lines, bad = [], []
    for i, (rel, label, size) in enumerate(source.samples):
        w, h = done[rel]["size"] or (0, 0)  # 0 x 0: unreadable, copied as it is (bad)
        per_tier = {str(t): list(capped_size(w, h, t)) for t in args.tiers}
        sample = {"id": i, "path": rel, "label": label, "bytes": size, "size": [w, h], "tiers": per_tier}
        if "bad" in done[rel]:
            sample["bad"] = done[rel]["bad"]
            bad.append(rel)
        lines.append(json.dumps(sample))
    body = gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)
    out.write_bytes(body, SAMPLES)
    manifest = TiersManifest(
        source=args.source,
        source_digest=source.digest,
        tiers=args.tiers,
        quality=args.quality,
        classes=source.classes,
        samples=len(source.samples),
        samples_sha256=hashlib.sha256(body).hexdigest(),
        source_bytes=sum(size for _, _, size in source.samples),
        tier_bytes={
            f: sum(done[rel]["tier_bytes"][k] for rel, _, _ in source.samples) for k, f in enumerate(folders)
        },
        bad_images=bad,
    )
    # bad_images only where there are any: a manifest without them stays readable by earlier versions
    exclude = None if bad else {"bad_images"}
    out.write_text(manifest.model_dump_json(indent=2, exclude=exclude), MANIFEST)
    out.remove(INTENT)
    out.remove(PROGRESS)
    out.remove(PROGRESS + ".parts")
    return manifest


@contextlib.contextmanager
def progress_display(console) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` for ``prepare``: a bar on a terminal, else a plain line every
    ``PLAIN_EVERY_S`` and at the end."""
    if console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = [
            TextColumn("prepare", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("", total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    last = 0.0

    def line(done: int, total: int) -> None:
        nonlocal last
        if done == total or time.monotonic() - last >= PLAIN_EVERY_S:
            last = time.monotonic()
            console.print(f"prepare: {done:,}/{total:,} images")

    yield line
