"""The HTML report, for a small image model and a small vector model, checked on disk and in a
headless browser (Debian's ``chromium``; skipped when it is not installed)."""

import html.parser
import re
import shutil
import subprocess
import types

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.nn import PyroModule

import pyro_lvm  # noqa: F401
from pyro_lvm.reporting import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class SmallVAE(PyroModule):
    """p(z) = N(0, I), p(x|z) = Bernoulli(MLP(z)) for images or N(MLP(z), s^2 I) for vectors."""

    def __init__(self, data_shape, latent_dim=2, hidden=32, likelihood="bernoulli"):
        super().__init__()
        self.data_shape, self.latent_dim, self.likelihood = tuple(data_shape), latent_dim, likelihood
        size = torch.Size(data_shape).numel()
        self.decoder = torch.nn.Sequential(torch.nn.Linear(latent_dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, size))
        self.encoder = torch.nn.Sequential(torch.nn.Linear(size, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2 * latent_dim))
        self.log_noise = torch.nn.Parameter(torch.tensor(-1.0))

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.latent_dim]).to_event(1))
            out = self.decoder(z).reshape(*z.shape[:-1], *self.data_shape)
            if self.likelihood == "bernoulli":
                likelihood = dist.Bernoulli(logits=out)
            else:
                likelihood = dist.Normal(out, self.log_noise.exp())
            pyro.sample("x", likelihood.to_event(len(self.data_shape)), obs=x)

    def guide(self, x):
        loc, log_scale = self.encoder(x.reshape(x.shape[0], -1)).chunk(2, dim=-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def fitted_run(tmp_path, lvm, train, test, test_labels, is_image, name, steps):
    # Parameters are module-local (pyro_lvm sets it), so a torch optimizer over lvm.parameters().
    optimizer = torch.optim.Adam(lvm.parameters(), lr=0.01)
    metrics = []
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss = Trace_ELBO().differentiable_loss(lvm.model, lvm.guide, train) / train.shape[0]
        loss.backward()
        optimizer.step()
        loss = loss.item()
        if step % (steps // 5) == 0:
            with torch.no_grad():
                valid = -Trace_ELBO().loss(lvm.model, lvm.guide, test) / test.shape[0]
            metrics.append({"epoch": len(metrics) + 1, "step": step, "train_loss": loss, "train_elbo": -loss,
                            "valid_elbo": valid, "seconds": 0.1 * step})
    data = types.SimpleNamespace(
        train=train, valid=test, test=test, train_labels=None, valid_labels=test_labels, test_labels=test_labels,
        data_shape=tuple(train.shape[1:]), is_image=is_image, name=name,
    )
    config = {"model": "small-vae", "hyperparameters": {"latent_dim": lvm.latent_dim}, "data": {"name": name},
              "objective": "elbo", "seed": 0}
    return types.SimpleNamespace(path=tmp_path / "run", config=config, model=lvm.eval(), data=data, metrics=metrics)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    images = (torch.tensor(digits.images, dtype=torch.float32) / 16 > 0.5).float().unsqueeze(1)
    labels = torch.tensor(digits.target)
    lvm = SmallVAE((1, 8, 8), latent_dim=4)
    return fitted_run(tmp_path_factory.mktemp("image"), lvm, images[:1000], images[1000:1300],
                      labels[1000:1300], True, "digits", steps=500)


@pytest.fixture(scope="module")
def vector_run(tmp_path_factory):
    torch.manual_seed(0)
    angle = torch.rand(700) * 2 * torch.pi
    points = torch.stack([angle.cos(), angle.sin()], -1) * 2 + 0.1 * torch.randn(700, 2)
    lvm = SmallVAE((2,), latent_dim=3, likelihood="normal")
    return fitted_run(tmp_path_factory.mktemp("vector"), lvm, points[:500], points[500:], None, False, "ring", steps=500)


class _Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.external = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
        for key in ("src", "href"):
            if re.match(r"^[a-z]+://|^//", attrs.get(key) or ""):
                self.external.append(attrs[key])


def check_page(page):
    parser = _Images()
    parser.feed(page.read_text())
    assert parser.external == [], "the page must not load anything from outside its folder"
    assert "<script" not in page.read_text()
    for source in parser.sources:
        image = page.parent / source
        assert image.is_file(), source
        assert image.read_bytes()[:8] == PNG_SIGNATURE, source
    return parser.sources


@pytest.mark.parametrize("run_name", ["image_run", "vector_run"])
def test_report_files(run_name, request):
    run = request.getfixturevalue(run_name)
    page = write_report(run)
    assert page == run.path / "report" / "index.html"
    sources = check_page(page)
    expected = {"curves.png", "samples.png", "reconstructions.png", "embedding.png", "kl_per_dim.png", "khat.png"}
    if run.data.is_image:
        expected |= {"traversals.png", "fuzziness.png"}
    assert set(sources) == expected
    text = page.read_text()
    assert "units active" in text and "I(x;z)" in text
    assert "Fuzziness of codes" in text
    if run.data.is_image:
        assert "sharpest codes" in text
    assert (run.path / "report" / "diagnostics.json").is_file()


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium binary on PATH (Debian: apt-get install -y chromium)")


def _run_chromium(binary, profile, *args):
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


# Writes every image's natural width into the page, to be read back from the dumped DOM.
PROBE = """<script>
window.addEventListener("load", function () {
  var out = document.createElement("pre"); out.id = "widths";
  out.textContent = Array.prototype.map.call(document.images, function (img) {
    return img.getAttribute("src") + "=" + img.naturalWidth; }).join(";");
  document.body.appendChild(out);
});
</script>"""


def test_report_renders_in_chromium(image_run, tmp_path):
    binary = _chromium()
    page = write_report(image_run, out_dir=tmp_path / "report")
    sources = check_page(page)
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _run_chromium(binary, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()).stdout
    probe.unlink()
    widths = dict(item.rsplit("=", 1) for item in re.search(r'<pre id="widths">([^<]*)</pre>', dom).group(1).split(";"))
    assert sorted(widths) == sorted(sources)
    assert all(int(width) > 0 for width in widths.values()), widths

    screenshot = tmp_path / "screenshot.png"
    _run_chromium(binary, tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1200,3000",
                  "--hide-scrollbars", page.as_uri())
    assert screenshot.read_bytes()[:8] == PNG_SIGNATURE


class Mixture(PyroModule):
    """A Gaussian mixture whose component is enumerated in the model: the guide samples nothing."""

    def __init__(self, data_shape=(2,), components=3):
        super().__init__()
        self.locs = torch.nn.Parameter(3 * torch.randn(components, *data_shape))

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        with pyro.plate("data", n):
            weights = torch.ones(self.locs.shape[0]) / self.locs.shape[0]
            component = pyro.sample("component", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(self.locs[component], 0.5).to_event(1), obs=x)

    def guide(self, x):
        pass


def test_report_for_a_model_without_guide_latents(tmp_path):
    torch.manual_seed(0)
    points = torch.randn(150, 2)
    data = types.SimpleNamespace(train=points, valid=points, test=points, train_labels=None, valid_labels=None,
                                 test_labels=None, data_shape=(2,), is_image=False, name="blobs")
    run = types.SimpleNamespace(path=tmp_path, config={"model": "mixture"}, model=Mixture(), data=data, metrics=[])
    page = write_report(run)
    # Every latent is summed out: log p(x) is exact, there are no importance weights to plot.
    assert set(check_page(page)) == {"samples.png"}
    assert "No latent-usage diagnostics: diagnose needs a guide that samples local latents" in page.read_text()
    assert "no importance weights" in page.read_text()


def test_the_api_function_report_is_not_shadowed_by_a_subpackage():
    """``pyro_lvm.report`` stays the API function after the report's modules are imported (a
    subpackage named ``report`` used to replace it with a module)."""
    import importlib

    importlib.import_module("pyro_lvm.reporting")
    pyro_lvm.diagnose  # noqa: B018 -- the lazy API attributes load their modules
    assert callable(pyro_lvm.report) and pyro_lvm.report.__module__ == "pyro_lvm.api"
