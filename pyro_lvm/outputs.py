"""Outputs beside the run proper: ``sample``'s picture or CSV and ``report``'s folder.

Both are written atomically (:mod:`pyro_lvm.files`): a full disk or Ctrl-C leaves the old output
or none, never a 0-byte picture or half a report. And neither replaces a file pyro-lvm did not write:

- ``sample``: a PNG carries the text chunk ``Software: pyro-lvm``, a JPEG the comment ``pyro-lvm``,
  a CSV the header ``x0,x1,...``; an existing ``--out`` without that mark is refused.
- ``report``: the folder gets a manifest, ``.pyro-lvm-report.json``, with the SHA-256 of every file
  the report wrote. A report replaces a file only if the manifest lists it unchanged; files of an
  earlier report that this one does not write again are removed. The new files are written into
  a temporary folder inside the target and renamed into place once all of them exist, the page last.

Inside a run directory nothing is written through a link. A run's default ``RUN/report`` folder and
``RUN/samples.*`` belong to the run, so regular files there are replaced even without a mark (a
report written before manifests existed).
"""

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from . import files
from .errors import UserError

SOFTWARE = "pyro-lvm"
MANIFEST = ".pyro-lvm-report.json"
_CSV_HEADER = re.compile(r"x0(,x\d+)*")


# ----------------------------------------------------------------------------------------------
# sample
# ----------------------------------------------------------------------------------------------

def image_grid_bytes(images, nrow, padding=1, pad_value=0.5, image_format="PNG"):
    """A grid of ``images`` [n, C, H, W] in [0, 1] as PNG or JPEG bytes, marked as pyro-lvm's (the
    pixels are those of ``torchvision.utils.save_image``)."""
    from PIL import Image, PngImagePlugin
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().cpu(), nrow=nrow, padding=padding, pad_value=pad_value)
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()
    picture = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if image_format == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", SOFTWARE)
        picture.save(buffer, format="PNG", pnginfo=info)
    else:
        picture.convert("RGB").save(buffer, format="JPEG", comment=SOFTWARE.encode())
    return buffer.getvalue()


def _csv_bytes(x):
    import numpy as np

    flat = x.reshape(len(x), -1).detach().cpu().numpy()
    text = io.StringIO()
    np.savetxt(text, flat, delimiter=",", header=",".join(f"x{i}" for i in range(flat.shape[1])), comments="",
               fmt="%.6g")
    return text.getvalue().encode()


def written_by_pyro_lvm(path):
    """Whether the regular file ``path`` carries pyro-lvm's mark (see the module docstring)."""
    suffix = Path(path).suffix.lower()
    try:
        with files.open_file(path) as f:
            if suffix == ".csv":
                return _CSV_HEADER.fullmatch(f.readline(1 << 20).decode("utf-8", "replace").strip()) is not None
            from PIL import Image

            with Image.open(f) as picture:
                mark = picture.info.get("Software") if suffix == ".png" else picture.info.get("comment")
    except Exception:  # noqa: BLE001 -- not readable as ours: not ours
        return False
    if isinstance(mark, bytes):
        mark = mark.decode("utf-8", "replace")
    return mark == SOFTWARE


def check_sample_target(out, inside_run=False):
    """Refuse to write samples to ``out`` where that would replace something pyro-lvm did not write
    (or where its folder is missing)."""
    folder = Path(out).parent
    where = files.kind(folder, follow=True)
    if where is None:
        raise UserError(f"folder {str(folder)!r} does not exist; create it or choose another --out")
    if where != "a directory":
        raise UserError(f"--out {out}: {folder} is {where}, not a folder; choose another --out")
    what = files.kind(out)
    if what is None:
        return
    fix = "choose another --out or remove it"
    if what == "a symbolic link":
        raise UserError(f"{out} is a symbolic link; pyro-lvm does not write through links (it could write "
                        f"elsewhere): {fix}")
    if what != "a regular file":
        raise UserError(f"{out} is {what}, not a file pyro-lvm wrote; {fix}")
    if inside_run and Path(out).name in ("samples.png", "samples.csv"):
        return
    if not written_by_pyro_lvm(out):
        raise UserError(f"{out} exists and was not written by pyro-lvm sample, so it is not replaced; {fix}")


def write_samples(out, x, image, nrow):
    """Write the samples ``x`` to ``out`` atomically: an image grid (PNG, JPEG) or a CSV."""
    out = Path(out)
    if image:
        data = image_grid_bytes(x, nrow, image_format="PNG" if out.suffix.lower() == ".png" else "JPEG")
    else:
        data = _csv_bytes(x)
    files.atomic_write_bytes(out, data, fix="choose another --out or remove it")


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

def _sha256(path):
    digest = hashlib.sha256()
    with files.open_file(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ReportFolder:
    """The folder a report is written to, as a context: files go to :attr:`staging`, and
    :meth:`commit` moves them into the folder; an error before that leaves the folder as it was.

    ``inside_run``: the folder lies in a run directory (no links followed there); ``owned``: it is
    the run's own ``RUN/report``, whose regular files may be replaced without a manifest.
    """

    def __init__(self, folder, inside_run=False, owned=False):
        self.folder, self.inside_run, self.owned = Path(folder), inside_run, owned
        self.staging, self.created, self.manifest = None, False, {}

    def __enter__(self):
        what = files.kind(self.folder)
        if what == "a symbolic link" and (self.inside_run or files.kind(self.folder, follow=True) != "a directory"):
            raise UserError(f"{self.folder} is a symbolic link; pyro-lvm does not write a report through a link "
                            f"(it could write elsewhere): remove it or give another --out")
        if what not in (None, "a directory", "a symbolic link"):
            raise UserError(f"--out {self.folder} is {what}; give a folder for the report")
        if what is None:
            try:
                os.makedirs(self.folder)
            except OSError as err:
                raise files._os_error(err, self.folder, "give another --out") from None  # noqa: SLF001
            self.created = True
        manifest = self.folder / MANIFEST
        if files.kind(manifest) not in (None, "a regular file"):
            self._remove_created()
            raise UserError(f"{manifest} is {files.kind(manifest)}; pyro-lvm writes that file itself: remove it")
        self.manifest = self._read_manifest()
        try:
            self.staging = Path(tempfile.mkdtemp(prefix=".pyro-lvm-report-", suffix=".tmp", dir=self.folder))
        except BaseException:
            self._remove_created()
            raise
        return self

    def _read_manifest(self):
        path = self.folder / MANIFEST
        if files.kind(path) != "a regular file":
            return {}
        try:
            manifest = json.loads(files.read_bytes(path, 1 << 20).decode())
            entries = manifest["files"]
            return {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, str)}
        except Exception:  # noqa: BLE001 -- a damaged manifest vouches for nothing
            return {}

    def _mine(self, name):
        path = self.folder / name
        if self.owned:
            return True
        return name in self.manifest and _sha256(path) == self.manifest[name]

    def check(self, names):
        """Refuse if writing ``names`` would replace something this folder's reports did not write."""
        for name in names:
            path = self.folder / name
            what = files.kind(path)
            if what is None:
                continue
            if what != "a regular file":
                raise UserError(f"{path} is {what}; a report does not replace it (nor write through a link): "
                                f"remove it or give the report another --out")
            if not self._mine(name):
                raise UserError(f"{path} exists and was not written by pyro-lvm report (or was changed since), so "
                                f"it is not replaced; give the report an empty --out folder or remove that file")

    def commit(self):
        names = sorted(os.listdir(self.staging), key=lambda n: (n == "index.html", n))
        self.check(names)
        written = {name: _sha256(self.staging / name) for name in names}
        for name in names:
            os.replace(self.staging / name, self.folder / name)
        for name in set(self.manifest) - set(names):  # figures of an earlier report not drawn again
            path = self.folder / name
            if files.kind(path) == "a regular file" and _sha256(path) == self.manifest[name]:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        files.atomic_write_bytes(self.folder / MANIFEST, (json.dumps({"written_by": SOFTWARE, "files": written},
                                                                      indent=2, sort_keys=True) + "\n").encode())
        os.rmdir(self.staging)
        self.staging = None

    def _remove_created(self):
        if self.created:
            with contextlib.suppress(OSError):
                os.rmdir(self.folder)

    def __exit__(self, kind, value, traceback):
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
            if kind is not None:
                self._remove_created()
