"""The 8-class ISIC 2019 taxonomy, in one place.

Everything that needs a class order, a name or a description reads it from
here: the manifest, the model's output layer, ``labels.json`` and the serving
API. The order is the one of ``CODES`` (alphabetical), which is also the
column order of the model's softmax output.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Category(str, Enum):
    MALIGNANT = "malignant"
    PRE_MALIGNANT = "pre-malignant"
    BENIGN = "benign"


@dataclass(frozen=True)
class LesionClass:
    code: str
    name: str
    description: str
    category: Category


CLASSES: tuple[LesionClass, ...] = (
    LesionClass(
        "AK",
        "Actinic keratosis",
        "A rough, scaly patch caused by years of sun exposure. It can turn into "
        "squamous cell carcinoma, so a doctor should look at it.",
        Category.PRE_MALIGNANT,
    ),
    LesionClass(
        "BCC",
        "Basal cell carcinoma",
        "The most common skin cancer. It grows slowly and rarely spreads, but "
        "it needs treatment.",
        Category.MALIGNANT,
    ),
    LesionClass(
        "BKL",
        "Benign keratosis",
        "A harmless growth such as a seborrheic keratosis, solar lentigo or "
        "lichen-planus-like keratosis.",
        Category.BENIGN,
    ),
    LesionClass(
        "DF",
        "Dermatofibroma",
        "A harmless, firm bump in the skin, often on the legs.",
        Category.BENIGN,
    ),
    LesionClass(
        "MEL",
        "Melanoma",
        "A cancer of the pigment cells. It can spread and is dangerous if not "
        "treated early: see a doctor promptly.",
        Category.MALIGNANT,
    ),
    LesionClass(
        "NV",
        "Melanocytic nevus",
        "A common mole. Usually harmless; watch it for changes in size, shape "
        "or colour.",
        Category.BENIGN,
    ),
    LesionClass(
        "SCC",
        "Squamous cell carcinoma",
        "A skin cancer that can grow and spread if not treated.",
        Category.MALIGNANT,
    ),
    LesionClass(
        "VASC",
        "Vascular lesion",
        "A growth made of blood vessels, such as a cherry angioma or "
        "angiokeratoma. Usually harmless.",
        Category.BENIGN,
    ),
)

CODES: tuple[str, ...] = tuple(c.code for c in CLASSES)
INDEX: dict[str, int] = {code: i for i, code in enumerate(CODES)}
BY_CODE: dict[str, LesionClass] = {c.code: c for c in CLASSES}
#: The categories a doctor should see. The referral score sums the classes in them by default
#: (``evaluate.referral.classes: null``; see ``dermascan.evaluation.referral``).
REFERRAL_CATEGORIES: tuple[Category, ...] = (Category.MALIGNANT, Category.PRE_MALIGNANT)
REFERRAL_CODES: tuple[str, ...] = tuple(c.code for c in CLASSES if c.category in REFERRAL_CATEGORIES)

# Ground-truth columns of the official files.
ISIC2019_COLUMNS: tuple[str, ...] = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
ISIC2018_COLUMNS: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")

# ISIC 2018 label -> ISIC 2019 label. AKIEC is deliberately absent: it covers
# both AK and SCC (of HAM10000's 327 AKIEC images, ISIC 2019 labels 130 AK and
# 197 SCC), so it has no single 2019 code. See ``dermascan.data.merge``.
LABEL_MAP_2018_TO_2019: dict[str, str] = {
    "MEL": "MEL",
    "NV": "NV",
    "BCC": "BCC",
    "BKL": "BKL",
    "DF": "DF",
    "VASC": "VASC",
}
AMBIGUOUS_2018 = {"AKIEC": ("AK", "SCC")}


def code_of(index: int) -> str:
    return CODES[index]


def index_of(code: str) -> int:
    try:
        return INDEX[code]
    except KeyError:
        raise ValueError(f"unknown class code {code!r}; expected one of {', '.join(CODES)}") from None

# Shown with every prediction, in labels.json, the API and the model card.
DISCLAIMER = (
    "This is not a diagnosis. dermascan is a research model that ranks eight dermoscopic lesion classes; "
    "only a clinician who examines the lesion can diagnose it. See a doctor about any lesion that worries you."
)
