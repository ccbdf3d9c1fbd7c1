"""Dataset registry: real CT scans known by name, source URL, SHA-256 and licence.

Each :class:`Dataset` names its files (path relative to a data folder, public URL, SHA-256),
its licence and citation, facts about its geometry, and how to load it. :func:`fetch` finds the
files — first in a *mirror* folder (argument, or the ``DIPUQ_DATA_MIRROR`` environment
variable) that holds them under the same relative paths, otherwise in a download cache
(argument, ``DIPUQ_CACHE``, or ``~/.cache/dipuq``), downloading what is missing. Every file's
SHA-256 is checked, in the mirror and in the cache; a download with the wrong hash is deleted
and raises :class:`~dipuq.errors.DataError`. Downloads are written to a temporary file and
renamed into place, so an interrupted download never leaves a partial file under its real name.
:func:`dipuq.data.loaders.open_dataset` turns a registered dataset into a ready-to-use
:class:`~dipuq.data.Scan`.

Example::

    >>> path = fetch("diamond-24737", mirror="/data/mirror")    # .../savu_24737, every file verified
    >>> get("tooth").loader, get("tooth").options["row"]
    ('hdf5', 0)
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dipuq._io import atomic_path
from dipuq.errors import DataError

__all__ = ["DataFile", "Dataset", "DATASETS", "register", "get", "fetch", "cache_path", "sha256sum", "download",
           "human_size"]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset: ``path`` relative to the data folder, its public ``url`` and SHA-256."""

    path: str
    url: str
    sha256: str


@dataclass(frozen=True)
class Dataset:
    """A named real scan: where its files come from, their hashes, licence, geometry and loader.

    ``entry`` is the path (relative to the data folder) the loader opens; ``loader`` is
    ``"hdf5"``, ``"tiff"``, ``"sinogram"``, ``"mat"`` or ``"nexus"`` and ``options`` are its keyword arguments (see
    :mod:`dipuq.data.loaders`); ``facts`` are human-readable geometry facts for ``dipuq data info``.
    """

    name: str
    title: str
    kind: str
    entry: str
    loader: str
    files: tuple[DataFile, ...]
    size: int
    licence: str
    citation: str
    source: str
    facts: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    def describe(self) -> str:
        """A multi-line text description (what ``dipuq data info NAME`` prints)."""
        lines = [f"{self.name}: {self.title}", f"  kind:       {self.kind}",
                 f"  size:       {human_size(self.size)} in {len(self.files)} file(s)",
                 f"  licence:    {self.licence}", f"  cite:       {self.citation}", f"  source:     {self.source}"]
        lines += [f"  {k + ':':<11} {v}" for k, v in self.facts.items()]
        more = f" (+{len(self.files) - 1} more)" if len(self.files) > 1 else ""
        lines.append(f"  files:      {self.files[0].url}{more}")
        return "\n".join(lines)


_DIAMOND_SHA256 = {
    "angles.txt": "c4b47e4bc56c58dd595038db7442366533711779ac0734776822e6ed21445444",
    "dark_00001.tiff": "d337e0c5282b6e3979426d9dac0fa0bffe6f758781b3e06ffcc25ae23fe42adf",
    "flat_00001.tiff": "aadd327726ffc3e8ea7624e4e8c59296c3b873b750ebac45c7da17cdb4df544a",
    "tiffs/raw_00000.tiff": "dd47a843334c620371a8f1db249cf20162c827998e228e5bacf7a3c395c059e5",
    "tiffs/raw_00001.tiff": "ea0720911b3baa248c35429d8905d8b300c2c65ac398108b0e784a51179b669f",
    "tiffs/raw_00002.tiff": "1ac5e573d492a52c837880679ab375550eeb853a3de7e1201588ce268157e15c",
    "tiffs/raw_00003.tiff": "773cdadcef6a705af1e98641c0595e76f4185c82a45b5cfc1a0c84decda0b926",
    "tiffs/raw_00004.tiff": "bc8dab357ff49ce53a3c835230d1064f0e61d8bae59239634bbbc1a197b3e9f0",
    "tiffs/raw_00005.tiff": "3e4748acfcb44952841ca00155b0c281b6cd4a4e64bca440f7b6ee5b41536a6d",
    "tiffs/raw_00006.tiff": "32cbc3e6fb8c3c7878793085c7aeb5622459b22fc82d77e3fa642f0dde420f3b",
    "tiffs/raw_00007.tiff": "51767a0b6cf63c5cf095696d8b9271eac0b6193bfd12582a6e01f4333495409f",
    "tiffs/raw_00008.tiff": "893313160b7a0f2e08863489447b66f12673ed0b7726856ae15b0bc47031703c",
    "tiffs/raw_00009.tiff": "1c37c2d2beb30c11ee2a66b376101870deb891726d7a4f8748b951c3fd9d99a2",
    "tiffs/raw_00010.tiff": "3d57a8e87378d451d687b8de0b9c737a8d5bf6ca79e005f098f846969ae5cb12",
    "tiffs/raw_00011.tiff": "7700d148a36d6e1ddeb1f6c8dbe4925e9a69452a6b3115651a7cc5280c9db195",
    "tiffs/raw_00012.tiff": "6c2e8a99b794a047a37fbabebccbb1178a4c5afd846a27f5b96759d65a3e1a75",
    "tiffs/raw_00013.tiff": "ea2f9e8292c89a1c9e7677927f9652d885dc5bcf883c4f176c2be7ed567c2e81",
    "tiffs/raw_00014.tiff": "0aad3e3604690a65d1b47a8ce1b4a91d1c2d6075a65b2aed3948c2c5ae4c3029",
    "tiffs/raw_00015.tiff": "85aa268ea0e0f63b1633309f67e78637b48aa18f4a1de73e80552eaf64d3b959",
    "tiffs/raw_00016.tiff": "e7356590f6117094dca76ff0863081c6f30ef7d6d96aa149b0f134a49be58b18",
    "tiffs/raw_00017.tiff": "0912423fc39f9891538b263f88526ab79a99c42de799da3afbb807c35537a2c5",
    "tiffs/raw_00018.tiff": "721c54978ef4d067e190c6f64248a9bd2dc57675df3be7e4f070262abc8ad017",
    "tiffs/raw_00019.tiff": "d99921cec27a30cf7c96b98559f3dfb556e76a35eab205d23e1849a428cf437c",
    "tiffs/raw_00020.tiff": "1ff4c6b1616af85d40f3c65b6bf20e95562d1649b3f599e858acbfcfa49f7da2",
    "tiffs/raw_00021.tiff": "8ca92529e2ec979f0b6987d10d3a3086e09bdbb0d99764a321ab6ae9655e267e",
    "tiffs/raw_00022.tiff": "706f7c3ace6b64cc773abb30a497f5f8c2b21fc36f26a64c2b56b514c48b0dc8",
    "tiffs/raw_00023.tiff": "f9d46e815a917083b60bb66d71e8aa142644973f3f67b5b560183e35d43cd40b",
    "tiffs/raw_00024.tiff": "cc928d7c53eb17754b184ee39d37b8211e400a29dae2bc2b10b5c33c8efb9010",
    "tiffs/raw_00025.tiff": "18b245b54be78339bbdfe4f185deb42bc27c2917210a65a23f3db01ed80849d5",
    "tiffs/raw_00026.tiff": "8ac7beeb15481a61c2ea4d17d1abf05cd90ecdc1c23c55b067319522de199133",
    "tiffs/raw_00027.tiff": "4e52fe959ccbfc87ddc575243c8ebfd4f80f18dbf904084feb051f05f4f02cc8",
    "tiffs/raw_00028.tiff": "effef8ee379d6ae5aca586d34593ee6f4b8828dc4f3646661dd7522901d922d8",
    "tiffs/raw_00029.tiff": "d9ec042704b9311e6fd4d0d5c40052432bc4c206550cab55f9c284cbfa06c4f6",
    "tiffs/raw_00030.tiff": "b67d75d215319da0356096ee4917b829c6b489d637404a7855b5f56be9d1708c",
    "tiffs/raw_00031.tiff": "2ac063fee5ccf475ed03e28b155e264644ce54ff559fbf5555efb4078726a86e",
    "tiffs/raw_00032.tiff": "5e5e6776f967a0742df05bb1e347ec17d49eff7ebd400b3f0ff2426243f88b86",
    "tiffs/raw_00033.tiff": "75472fd7798192d6ee7282e5944bc0cb4aacaee72d4caebc96002f1bbdb493bc",
    "tiffs/raw_00034.tiff": "c51cc63a01d817cf3ed8bd68f69e26cf72b05b1825cd92b0eb707585a27ddf83",
    "tiffs/raw_00035.tiff": "1615aab6df886746c7e5846fcdc0db54fc1b484f753eb24ff07f3a35de73feed",
    "tiffs/raw_00036.tiff": "7520a4688029ccad3650b0bf561fc1f221082643b2ee2af67cc1db4d4940022c",
    "tiffs/raw_00037.tiff": "0c3da8391b0190e76cb37e603b90a42cf8cf6591bc8d627b5ee3ddf9de93ac6e",
    "tiffs/raw_00038.tiff": "94c21a0d4bdb656fde0896a6df6f4ed4ec94efd83786de4b89d8610d7f93382a",
    "tiffs/raw_00039.tiff": "792860920e2a8e4db789110e60d14cbdd41a7388b72ba6f7aa8c13605982d6e3",
    "tiffs/raw_00040.tiff": "001b09b9e66a8a60d0d3bebf3318b268c69063bb4b7df9d7e2608e416118811a",
    "tiffs/raw_00041.tiff": "60cfe92177d8f5cd9683a47e10cca730cf0b9923bd6e5559064b08571834ebc1",
    "tiffs/raw_00042.tiff": "7f9677b7b6515d3975e3e4af8c8765dd16131d1c7a980ef6110b647053e15605",
    "tiffs/raw_00043.tiff": "52a87b7cc1080d37941e95ccf6978fa4dfc6a626044699043cc76647b7441e8a",
    "tiffs/raw_00044.tiff": "c172956669340fd0c1bbfd8f39032220b361408309151530da10372ebeb99cf6",
    "tiffs/raw_00045.tiff": "df02504121db9732231659a74db9d5c17eb3533c32537581c084d23553c27279",
    "tiffs/raw_00046.tiff": "27b444888edec18b39ff5092194812b9f61d739402116b79fe23f17be2cfa0a7",
    "tiffs/raw_00047.tiff": "8fe96a6f75070c378935cfe14fabfa8f8715360ac50c8b38871e12ea9697a92e",
    "tiffs/raw_00048.tiff": "fe6ad504d3be9b763a638f90a77fd70687d5d56c6fa4d48d63b4413ffb1a25d8",
    "tiffs/raw_00049.tiff": "9f047b0ede35ea224c2e26144e92b599d3c2d9872c49695d2fa6021273ab8eea",
    "tiffs/raw_00050.tiff": "c02acaf324d04bfa09405a8205d59189e456413bceec0be955c546a65494d101",
    "tiffs/raw_00051.tiff": "e156c08bc403f3d5ed484e781f3b599fb946809d552d254729acd059320d4293",
    "tiffs/raw_00052.tiff": "3639cdf45f8015d069f7716770ccbd8d64e7b22b70eb80d82a25565afe02b18f",
    "tiffs/raw_00053.tiff": "0f044e43d64712bab609b0c084c1efa7638d5343f2bb31f75f644e76d75e36ae",
    "tiffs/raw_00054.tiff": "10dd752edb5de571f61aa34ef21738a2471fdb91d404d98eaac32e921f275b16",
    "tiffs/raw_00055.tiff": "ab33957eb46d21e7153b5f3302fabc1154da4f2d727fe2fd6f02892e45b9cb37",
    "tiffs/raw_00056.tiff": "d5d98c6bfe40ed5d79840ce6ef4f4c3db6477357307b258398990e42e9607481",
    "tiffs/raw_00057.tiff": "f2136275ab04b8c345ce82c50186cb9552ef7849576d212c9e182e16fa92b21c",
    "tiffs/raw_00058.tiff": "07a1479e5ff1fc9711774ff1224e48ab96da4eb78420d5f8330f915a61407778",
    "tiffs/raw_00059.tiff": "1f8c66ab470e36ea05fd0db98e5cd24eb21815ca52def2b6f9739b1e0883e2ac",
    "tiffs/raw_00060.tiff": "181d708d6855c790ffcfd3f019c7e5cdab9c4ba6ec4cba4740d326da38dc10a2",
    "tiffs/raw_00061.tiff": "82972cbd311bbd6762d8b40d406d1817ed79dea837d121514f577212a0ef9726",
    "tiffs/raw_00062.tiff": "e1f63d099dd2dfe0da55f734dccb37135785b8f309c5dbffe323107526496552",
    "tiffs/raw_00063.tiff": "58fbb51f2722e3598e4708f75dc2899c4f3f24fce433f844693b0c83e45233fb",
    "tiffs/raw_00064.tiff": "06d0eb35388bd2fee60c00955db612125ea9c7acb2a7a088c92dc2c7f097a810",
    "tiffs/raw_00065.tiff": "07fd336af7e24eaa0e6407baa1b8729a39813bd6ab71976780a08cfbd6f76a2e",
    "tiffs/raw_00066.tiff": "61668263ab3c1066e4bc19786bc6308ea045b947dc99f8ae45bea875c6e400ad",
    "tiffs/raw_00067.tiff": "9d35f909b0b96d2050770827f6af6738081628c73df5d0aad03d1dfb3fc80073",
    "tiffs/raw_00068.tiff": "c9b1d7decf79e882dd049a547eb8e69475314f1ec88eb8f7bc4bf4bb0505553d",
    "tiffs/raw_00069.tiff": "ab50f86f721580f49d80bb2449d1825fe84fe8d861db4cfc579078ba748b3907",
    "tiffs/raw_00070.tiff": "33bf4f2a47be130e8f05ae4fd677e2923125713a54c117827c8050c9d903a9b9",
    "tiffs/raw_00071.tiff": "f94b4e8932d324cc99b618d352f06fe946e61524a914fdc7024668db173f064b",
    "tiffs/raw_00072.tiff": "c46eff5f80473586f10dd390753dc324783d579717a346f2f6713353b44a3fa5",
    "tiffs/raw_00073.tiff": "126eeee195716206885ce09f3152fb46cdd0266234f8587e870630159eb75338",
    "tiffs/raw_00074.tiff": "69cdcc48010cf0f42a7260b6438b73aaa1fc12c9536e703adf039afca926947f",
    "tiffs/raw_00075.tiff": "c537b9cdae98da5772d6476163bf5fd6a0b039f1131a3a05144acc07b8029f38",
    "tiffs/raw_00076.tiff": "427c0198184c4192d5723c51d98cc06b9f556f3f1d1311f38bb8037caff059c7",
    "tiffs/raw_00077.tiff": "65be5ae9975c55aa3771cd76cf2eb5cc71440742b004052836d6a705b03c0e2c",
    "tiffs/raw_00078.tiff": "6aff4397e8cfe25451cc34f42e867668bac3e61b8189ba25bd20893f00241df1",
    "tiffs/raw_00079.tiff": "85db4eabee3d0242d68e257a84f284cb196d234cdf9b836316964ab24108915e",
    "tiffs/raw_00080.tiff": "fc54892158d1574828ec524337b5fd1c7a23f798f64f8676b33260d0cf7cda32",
    "tiffs/raw_00081.tiff": "5d7d448ab6a9f2106e3ad1a647db293fc7753c5d1f02753289820f05f41981f2",
    "tiffs/raw_00082.tiff": "158d23dbf50ad213085c799926c121142c42bdaf7dd878daa6ddc8259dfb2766",
    "tiffs/raw_00083.tiff": "709f1716e713ba587954d7c725e792684ca904a5a154584768e0a3b993818517",
    "tiffs/raw_00084.tiff": "03a7c69908a9c21ff97b6ff5df383466072d22bce9406d231bb6002586886c37",
    "tiffs/raw_00085.tiff": "658b291974e04ffa97b5615c6357080421a67a5e38ade9e121c685aafc8b0f00",
    "tiffs/raw_00086.tiff": "b0179f39ae212b40c7e6f5ac89c1542cdb4e8a41238ccb500e016018ab54225b",
    "tiffs/raw_00087.tiff": "c698f8851fe5597cd9a499532ac2c8aa2aff72b3cfda1ca9aea4c7e8256f2559",
    "tiffs/raw_00088.tiff": "324fdfb22de746edb03b35cae235e2e39bd55a5da2c35e83d7803f1874218926",
    "tiffs/raw_00089.tiff": "43a0c645de8618f177460d6a26f4932a54f095f22b0cb3bf0d67f3bc5fb440b7",
    "tiffs/raw_00090.tiff": "7332c03e099270a342bda2e2db10657b0036965c84d90fca3a3b1d2783cf7f8c",
}


_TOOTH_COMMIT = "2c94ed18a06f7908b018c6f8e43d320f8a8488f2"
_SAVU_COMMIT = "0dad8303fe51a5ea71b977ed664eafe10b540361"
_SAVU_URL = f"https://raw.githubusercontent.com/DiamondLightSource/Savu/{_SAVU_COMMIT}/test_data/data/image_test/"

DATASETS: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
    """Add (or replace) a dataset in :data:`DATASETS`; returns it."""
    DATASETS[dataset.name] = dataset
    return dataset


register(Dataset(
    name="tooth",
    title="APS tooth, one slice pair (TomoPy test data)",
    kind="2D parallel, raw counts (HDF5 Data Exchange)",
    entry="tomopy_tooth.h5",
    loader="hdf5",
    files=(DataFile("tomopy_tooth.h5",
                    f"https://raw.githubusercontent.com/tomopy/tomopy/{_TOOTH_COMMIT}/source/tomopy/data/tooth.h5",
                    "ab1d9bd073b7fb1beae4defa991c2a2626605c5cf1f4be0d0203656bc47b6489"),),
    size=1043312,
    licence="BSD-3-Clause-style (TomoPy, UChicago Argonne LLC)",
    citation="Gürsoy D, De Carlo F, Xiao X, Jacobsen C. TomoPy. J Synchrotron Rad 21 (2014) 1188-1193",
    source=f"https://github.com/tomopy/tomopy/blob/{_TOOTH_COMMIT}/source/tomopy/data/tooth.h5",
    facts={
        "beam": "parallel (synchrotron, APS); loaded as 2D (detector row 0; row=1 is the other slice)",
        "angles": "181, evenly over [0°, 180°) (0 … 179.0°, step 180/181°)",
        "detector": "2 rows × 640 columns; 10 flat and 10 dark frames",
        "cor": "axis at column 295.6 (0-based pixel centres; 296 in TomoPy's convention), 23.9 px left of centre",
        "preprocess": "-log((data - dark) / (flat - dark)), ratio clipped at 1e-3; bin by 4 (160 px) for CPU runs",
        "sparse": "reference: all 181 angles; sparse case: 20-30 evenly spaced angles",
    },
    options={"row": 0, "cor": 295.575, "angle_units": "deg"},
))

register(Dataset(
    name="diamond-24737",
    title="Diamond Light Source test scan 24737 (Savu test data)",
    kind="3D parallel, raw TIFF projections",
    entry="savu_24737",
    loader="tiff",
    files=tuple(DataFile(f"savu_24737/{rel}", _SAVU_URL + rel, sha) for rel, sha in _DIAMOND_SHA256.items()),
    size=4124386,
    licence="Apache-2.0 / GPL-3.0 (Savu, Diamond Light Source)",
    citation="Wadeson N, Basham M. Savu: a Python-based, MPI framework for simultaneous processing of "
             "multiple, N-dimensional, large tomography datasets. arXiv:1610.08015 (2016)",
    source=f"https://github.com/DiamondLightSource/Savu/tree/{_SAVU_COMMIT}/test_data/data/image_test",
    facts={
        "beam": "parallel (synchrotron); the rotation axis runs across detector rows: row r is slice r's sinogram",
        "angles": "91 projections, -88.2° … 91.8° in 2° steps = lines 10 … 100 (0-based) "
                  "of angles.txt (110 lines)",
        "detector": "135 rows × 160 columns, uint16; one flat and one dark field (pixel (0, 0) is dead)",
        "cor": "axis at column 85.8 (0-based pixel centres; 86.25 of 160 in Savu's convention), 6.3 px right of centre",
        "preprocess": "-log((P - D) / (F - D)), ratio clipped at 1e-3, dead pixels interpolated; "
                      "crop to 64-96 voxels per side for CPU runs",
        "sparse": "reference: all 91 angles; sparse case: 23 or 12 evenly spaced angles",
    },
    options={"angle_start": 10, "angle_units": "deg", "cor": 85.825},
))


_WOOD_COMMIT = "6a99fe83d2fb40187589f54a564b5ba0d7a4e1ea"
_WOOD_URL = (f"https://raw.githubusercontent.com/neutronimaging/imagingsuite/{_WOOD_COMMIT}"
             "/frameworks/tomography/data/")

register(Dataset(
    name="psi-wood",
    title="PSI neutron CT of petrified wood, one normalised sinogram (imagingsuite test data)",
    kind="2D parallel, line integrals over 360° (TIFF sinogram), ring artefacts",
    entry="psi_wood/woodsino_0200.tif",
    loader="sinogram",
    files=(DataFile("psi_wood/woodsino_0200.tif", _WOOD_URL + "woodsino_0200.tif",
                    "93b356fc8123a4a6767c046d4751debcfb560d1e7fecdbbe99c882c526a78e7f"),
           DataFile("psi_wood/woodsino_0200.txt", _WOOD_URL + "woodsino_0200.txt",
                    "92efdb33bd066511702cab3b12e4eef25e4573e1dfe986014382067a7956e621")),
    size=1442710 + 164,
    licence="GPL-3.0 (imagingsuite repository licence; no separate data licence)",
    citation="Kaestner AP. MuhRec - a new tomography reconstructor. Nucl Instr Meth A 651 (2011) 156-160 "
             "(PSI neutron imaging, proposal P08062)",
    source=f"https://github.com/neutronimaging/imagingsuite/tree/{_WOOD_COMMIT}/frameworks/tomography/data",
    facts={
        "beam": "parallel (neutrons, PSI); one slice: the sinogram is (625 angles, 577 columns) float32",
        "angles": "625 over 360° in order: arange(625) · 360/625 degrees (step 0.576°)",
        "values": "already flat/dark corrected and -log-ed: -0.17 … 1.38; no raw counts",
        "cor": "axis at column 283.7 (0-based pixel centres, estimated; the .txt says 'a decent center is "
               "at 284 pixels'), 4.3 px left of centre",
        "rings": "strong stripes: data.stripe = 'sort' (or 'mean') cuts the FBP's ring amplitude 3x (2x)",
        "sparse": "reference: all 625 angles; sparse case: 40-60 angles; bin by 4 for CPU runs",
    },
    options={"arc_deg": 360.0, "cor": 283.725},
))

_LIQUIDET_COMMIT = "c03a422e5345df496b64ec29a344a689ee4bbbfd"

register(Dataset(
    name="liquidet-n6",
    title="Liquid-cell HAADF-STEM tilt series N6, six nanoparticles (LiquidET, Nat Commun 2024)",
    kind="3D parallel tilt series, limited angle (-46° … +44°), repeated tilts (MATLAB .mat)",
    entry="liquidet_n6/N6_liquid_sample_stack.mat",
    loader="mat",
    files=(DataFile("liquidet_n6/N6_liquid_sample_stack.mat",
                    f"https://raw.githubusercontent.com/ajinkyakadu/LiquidET_NatComm2024/{_LIQUIDET_COMMIT}"
                    "/data/N6/N6_liquid_sample_stack.mat",
                    "e4f65fcd5812f925d2cddc9f795d1f4b054da317268c8717ad1d0cabbbfa84d2"),),
    size=3593733,
    licence="GPL-3.0 (the repository's LICENSE file; its README badge says MIT)",
    citation="Arenas Esteban D, Wang D, Kadu A, et al. Quantitative 3D structural analysis of small colloidal "
             "assemblies under native conditions by liquid-cell fast electron tomography. Nat Commun 15 (2024)",
    source=f"https://github.com/ajinkyakadu/LiquidET_NatComm2024/tree/{_LIQUIDET_COMMIT}/data/N6",
    facts={
        "beam": "parallel (electron tomography); tilt axis along array axis 0 of stack.data (256, 256, 116): "
                "row r is slice r's sinogram",
        "angles": "116 frames at 46 tilts, -46° … +44° in 2° steps, 1-4 frames per tilt; averaged per tilt "
                  "by default (repeated='mean' / data.repeated; 'keep' keeps all 116)",
        "values": "HAADF intensity 0 … 0.686, ≈ projected mass: used as line integrals (no -log)",
        "detector": "256 rows × 256 columns, pixel 0.26 (pix_sz, probably nm; the geometry is in pixels)",
        "cor": "assumed at the detector centre: no two tilts are 180° apart, so estimate_cor cannot check it",
        "sparse": "only a ~90° range: no full-angle reference; use held-out tilts for self-consistency",
    },
    options={"repeated": "mean"},
))

_HTTOMO_COMMIT = "f766bda7e856d0bb2cba317f6e99a5dc709ad1be"
_HTTOMO_URL = f"https://raw.githubusercontent.com/DiamondLightSource/httomo/{_HTTOMO_COMMIT}/tests/test_data/k11_diad/"

register(Dataset(
    name="diamond-k11",
    title="Diamond DIAD (K11) raw NeXus scan 18014, tiny crop (httomo test data)",
    kind="3D parallel, raw counts, NeXus with image_key flats/darks",
    entry="httomo_k11/k11-18014.nxs",
    loader="nexus",
    files=tuple(DataFile(f"httomo_k11/{rel}", _HTTOMO_URL + rel, sha) for rel, sha in (
        ("k11-18014.nxs", "91c0c8ac337e5bbdc157cf3718f6cc7b2fa527e5213ef87c7c5060fb025ab02a"),
        ("k11-18014/k11-18014-imaging.h5", "9655a2e74dab03ac08ac4b1eb98aae4c6a345788b4e57d4a52911aa7bb12dcd1"),
        ("k11-18014/k11-18014-pcompPanda.h5", "f5fc0047e43707f3b6e65f963ca2a4636a3ce0ef5f1815c16284ef1c89b86193"))),
    size=236121 + 3847296 + 29072,
    licence="Apache-2.0 / GPL-3.0 (httomo, Diamond Light Source)",
    citation="httomo: High-throughput tomography pipeline, Diamond Light Source, "
             "https://github.com/DiamondLightSource/httomo",
    source=f"https://github.com/DiamondLightSource/httomo/tree/{_HTTOMO_COMMIT}/tests/test_data/k11_diad",
    facts={
        "beam": "parallel (synchrotron, DIAD); frames (3201, 22, 26) uint16 in k11-18014-imaging.h5, "
                "linked from the .nxs",
        "frames": "image_key (entry/instrument/imaging): 3001 projections (0), 100 flats (1), 100 darks (2), "
                  "in blocks of 50 before and after the scan",
        "angles": "entry/imaging/gts_theta_value (in k11-18014-pcompPanda.h5): 90° … 270° in ~0.06° steps",
        "preprocess": "-log((P - mean dark) / (mean flat - mean dark)), ratio clipped at 1e-3",
        "cor": "not estimated (axis at the detector centre): the crop shows no object",
        "use": "tests of NeXus / image_key loading, flat/dark correction and angles, not reconstruction quality",
    },
    options={},
))


def get(name: str | Dataset) -> Dataset:
    """The registered dataset called ``name`` (a :class:`Dataset` is returned as is)."""
    if isinstance(name, Dataset):
        return name
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}: available: {', '.join(DATASETS)}") from None


def cache_path(path: str | os.PathLike | None = None) -> Path:
    """The download cache: ``path``, else ``$DIPUQ_CACHE``, else ``~/.cache/dipuq``."""
    if path is not None:
        return Path(path).expanduser()
    if os.environ.get("DIPUQ_CACHE"):
        return Path(os.environ["DIPUQ_CACHE"]).expanduser()
    return Path.home() / ".cache" / "dipuq"


def sha256sum(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str | Dataset, cache_dir: str | os.PathLike | None = None,
          mirror: str | os.PathLike | None = None, *, quiet: bool = True) -> Path:
    """Local path of a dataset's entry (file or folder), every file SHA-256 verified.

    Looks in ``mirror`` (or ``$DIPUQ_DATA_MIRROR``) first: if it holds all files, they are
    verified and used in place (a wrong hash there is an error; the mirror is never modified).
    Otherwise files go to the cache (``cache_dir``, ``$DIPUQ_CACHE`` or ``~/.cache/dipuq``);
    missing or corrupt ones are (re-)downloaded from their URLs.
    """
    ds = get(name)
    mirror = mirror if mirror is not None else os.environ.get("DIPUQ_DATA_MIRROR") or None
    if mirror is not None:
        root = Path(mirror).expanduser()
        if all((root / f.path).is_file() for f in ds.files):
            for f in ds.files:
                got = sha256sum(root / f.path)
                if got != f.sha256:
                    raise DataError(f"mirror file {root / f.path} has SHA-256 {got[:12]}…, expected "
                                    f"{f.sha256[:12]}… (corrupt or a different version)")
            return root / ds.entry
    root = cache_path(cache_dir)
    for i, f in enumerate(ds.files):
        target = root / f.path
        if target.is_file():
            if sha256sum(target) == f.sha256:
                continue
            target.unlink()  # corrupt cached copy: download again
        if not quiet:
            print(f"downloading {f.url} ({i + 1}/{len(ds.files)})", flush=True)
        hint = (f"; the mirror {mirror} lacks some files" if mirror is not None else
                "; offline? set DIPUQ_DATA_MIRROR (or --mirror) to a folder holding the files")
        download(f.url, target, f.sha256, hint=hint)
    return root / ds.entry


def download(url: str, target: str | os.PathLike, sha256: str, *, timeout: float = 60.0, hint: str = "") -> Path:
    """Download ``url`` to ``target`` atomically, verifying its SHA-256; nothing is kept on failure."""
    target = Path(target)
    h = hashlib.sha256()
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    for chunk in iter(lambda: resp.read(_CHUNK), b""):
                        h.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                raise DataError(f"cannot download {url}: {' '.join(str(reason).split())}{hint}") from None
        got = h.hexdigest()
        if got != sha256:
            raise DataError(f"download of {url} has SHA-256 {got[:12]}…, expected {sha256[:12]}…; "
                            "the file was discarded")
    return target


def human_size(n: int) -> str:
    """A byte count for people: ``1043312`` → ``"1018.9 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
