import math

import pytest
import torch
from conftest import tiny

from trainables.config import ConfigError, load_config
from trainables.robustness import band_mask, band_noise, noise_accuracy


@pytest.mark.parametrize("size,bands", [(32, 8), (16, 8), (24, 4)])
def test_band_noise_energy_is_in_its_band_at_the_requested_rms(size, bands):
    gen = torch.Generator().manual_seed(0)
    for band in range(bands):
        noise = band_noise((6, 3, size, size), band, bands, 0.1, gen)
        rms = noise.double().flatten(1).pow(2).mean(1).sqrt()
        torch.testing.assert_close(rms, torch.full((6,), 0.1, dtype=torch.float64), rtol=1e-5, atol=0)
        power = torch.fft.fft2(noise.double()).abs().pow(2).sum((0, 1))  # (size, size) over images and channels
        inside = power[band_mask(size, band, bands)].sum() / power.sum()
        assert inside > 1 - 1e-9, (band, float(inside))
        f = torch.fft.fftfreq(size, dtype=torch.float64).abs() * 2 * math.pi
        radius = torch.maximum(f[:, None], f[None, :])
        centroid = float((power * radius).sum() / power.sum())  # the noise's mean frequency rises band by band
        assert band * math.pi / bands - 1e-9 <= centroid <= (band + 1) * math.pi / bands + 1e-9


def test_fixed_amplitude_noise_carries_more_energy_in_the_high_bands_as_park_and_kim_add_it():
    """Park & Kim add white noise of one std in normalised space, band-passed and not rescaled: a band's RMS is the
    std times the square root of its share of the frequencies, where the
    default convention gives every band one RMS (on 32 px, 8 bands: the highest ~6x the lowest)."""
    size, bands, std = 32, 8, 0.5
    gen = torch.Generator().manual_seed(0)
    rms = []
    for band in range(bands):
        noise = band_noise((64, 3, size, size), band, bands, std, gen, amplitude="fixed")
        rms.append(float(noise.double().pow(2).mean().sqrt()))
        share = float(band_mask(size, band, bands).double().mean())
        assert rms[-1] == pytest.approx(std * math.sqrt(share), rel=0.05)
    assert rms[-1] / rms[0] > 4
    cfg = load_config(tiny(), ["eval.noise.amplitude=fixed", "eval.noise.scale=0.5"])
    assert (cfg.eval.noise.amplitude, cfg.eval.noise.scale) == ("fixed", 0.5)
    with pytest.raises(ConfigError, match="eval.noise.amplitude"):
        load_config(tiny(), ["eval.noise.amplitude=loud"])
    # added in normalised space: a classifier of normalised inputs sees exactly the band-passed noise
    images = torch.full((4, 3, size, size), 128, dtype=torch.uint8)
    seen = []
    noise_accuracy(lambda x: (seen.append(x), torch.zeros(len(x), dtype=torch.long))[1], images,
                   torch.zeros(4, dtype=torch.long), size, bands, std, seed=0, prefix="p", amplitude="fixed")
    clean, noisy_top = seen[0], seen[-1]
    assert float((noisy_top - clean).pow(2).mean().sqrt()) == pytest.approx(rms[-1], rel=0.1)


def test_bands_tile_the_spectrum_and_too_many_bands_are_refused():
    masks = torch.stack([band_mask(32, b, 8) for b in range(8)])
    assert bool((masks.sum(0) == 1).all())  # every frequency in exactly one band
    with pytest.raises(ValueError, match="holds no frequency"):
        band_noise((1, 3, 8, 8), 5, 8, 0.1, torch.Generator())
    with pytest.raises(ConfigError, match="eval.noise.bands"):
        load_config(tiny(**{"eval__noise__bands": 17}))


def test_noise_accuracy_drop_of_a_low_pass_classifier_is_largest_at_low_frequencies():
    """A classifier that reads only the image's mean brightness (a low-pass one) loses accuracy to low-frequency
    noise and none to high-frequency noise."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    images = (labels * 80 + 80).view(-1, 1, 1, 1).expand(-1, 3, 16, 16).to(torch.uint8).contiguous()
    base = float((80 / 255 - 0.485) / 0.229 + (160 / 255 - 0.485) / 0.229) / 2  # midpoint in normalised units

    def classify(x):  # normalised (B, 3, 16, 16) -> mean of channel 0 above the midpoint
        return (x[:, 0].mean((1, 2)) > base).long()

    out = noise_accuracy(classify, images, labels, 16, 4, 1.0, seed=0, prefix="lp")
    assert out["lp_top1_clean"] == 1.0
    assert out["noise/0/lp_top1_drop"] > 0.1
    assert out["noise/3/lp_top1_drop"] == 0.0
    del gen
