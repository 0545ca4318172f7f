"""Derive `dataset_registry.yaml` from the SegBook dataset table (maintenance script, run once).

The YAML is the source of truth afterwards; this script documents how it was derived so the derivation can be
reviewed and repeated. Inputs (from `../shared/data`):
- `segbook_datasets.csv`: the paper's table (number, name, citation, modality, target, cases) and the authors'
  published metadata (task folder, channels, plans, split, labels);
- `segbook_structure_categories.csv`: how the authors group label names, used as evidence for region/bone/vessel.

Every judgement is an explicit table below: label corrections, structure vs lesion, the TotalSegmentator classes
each seen structure matches, regions the labels do not settle, ids for the duplicated paper numbers, and the
sources and licences we verified. A label name that no table classifies stops the script.

    python scripts/build_registry.py [--data ../shared/data] [--output dataset_registry.yaml]
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segbook.registry import TOTALSEG_V1_CLASSES, read_registry_file  # noqa: E402

# --- Dataset ids ---------------------------------------------------------------------------------------------------
# The paper gives 044, 051, 701 and 702 to two datasets each. Neither keeps the number (so "044" stays ambiguous and
# no id silently prefers one of them); each gets a free id next to its number.
DUPLICATE_IDS = {
    "Task044_CrossMoDA23": 45, "Task044_KiTS23": 46,
    "Task051_AMOS_CT": 54, "Task051_LAScarQS22_task2": 55,
    "Task701_LNQ2023": 705, "Task701_SegRap2023": 706,
    "Task702_CAS2023": 707, "Task702_SegRap2023_Task2": 708,
}

# --- Label names ---------------------------------------------------------------------------------------------------
# Obvious typos and stray whitespace in the published names (applied everywhere).
NAME_FIXES = {"Bain stem": "Brain stem", "cocygis": "Coccyx", "heart": "Heart", "trachea": "Trachea",
              "small bowel": "Small bowel", "T13": "Vertebrae T13"}

_VERTEBRA_SHIFT = ("'Vertebrae T13' at 9 and T2-T8 at 10-16 contradict T10-T12 at 17-19 and L1-L6 at 20-25; the "
                   "VerSe convention (C1-C7 = 1-7, T1-T12 = 8-19, L1-L6 = 20-25, T13 = 28) puts T2-T9 at 9-16")
# (key, index) -> (corrected name, reason). Only where the published name is demonstrably wrong.
LABEL_FIXES: dict[tuple[str, int], tuple[str, str]] = {
    ("Task005_Prostate", 2): ("Prostate transition zone",
                              "MSD Task05 labels are 1 = peripheral zone, 2 = transition zone (central gland)"),
    ("Task013_ACDC", 3): ("Left ventricle", "label 2 is the myocardium already; ACDC labels are 1 = right ventricle, "
                                            "2 = myocardium, 3 = left ventricle cavity"),
    ("Task701_SegRap2023", 36): ("Left temporal lobe", "'Right temporal lobe' is label 37 as well, and every other "
                                                       "paired organ of this dataset is listed left then right"),
    **{(key, i): (f"Vertebrae T{i - 7}", _VERTEBRA_SHIFT)
       for key in ("Task083_VerSe2020", "Task601_CTSpine1K_Full") for i in range(9, 17)},
}

# Labels whose published name does not say what the dataset annotates; kept as published, explained in notes.
LABEL_NOTES = {
    ("Task105_DICOM_LIDC_IDRI_Nodules", 1): "LIDC-IDRI annotates lung nodules; label 1 keeps its published name "
                                            "'Lymph nodes' and is treated as a lesion",
    ("Task701_LNQ2023", 1): "LNQ2023 annotates mediastinal lymph nodes (larger than 1 cm); label 1 keeps its "
                            "published name 'Pulmonary nodule'",
}

# --- Structure or lesion -------------------------------------------------------------------------------------------
LESIONS = {
    "Brain aneurysm", "Brain lesion", "Breast tumor", "COVID-19 lesion", "Colon cancer primaries", "Edema",
    "Enhancing tumor", "Extra vestibular schwannoma", "GTV lymph node", "GTV nasopharynx",
    "Hypoxic ischemic encephalopathy", "Intra vestibular schwannoma", "Intracranial hemorrhage", "Ischemic stroke",
    "Kidney cyst", "Kidney tumor", "Left atrial scar", "Left ventricular myocardial edema",
    "Left ventricular myocardial scars", "Lesion", "Liver tumor", "Lung adenocarcinoma", "Lung cancer",
    "Lung nodule", "Lung tumor", "Lymph nodes", "Nasopharyngeal cancer", "Necrosis", "Non-enhancing tumor",
    "Other pathology", "Pancreatic tumor mass", "Pulmonary nodule", "Treated aneurysm", "White matter hyperintensity",
}

# --- Seen structures: label name -> the TotalSegmentator v1 classes it equals (one class or a union) -----------------
# Conservative: a structure is seen only when it is a class or a union of classes with the same extent. Parts of a
# class (femoral head of femur, portal vein of portal_vein_and_splenic_vein, ascending aorta, cervical esophagus,
# brain sub-regions) and supersets (airway = trachea + bronchi) are unseen: the network never learned their borders.
_HEART = ["heart_atrium_left", "heart_atrium_right", "heart_myocardium", "heart_ventricle_left",
          "heart_ventricle_right"]
_LEFT_LUNG = ["lung_lower_lobe_left", "lung_upper_lobe_left"]
_RIGHT_LUNG = ["lung_lower_lobe_right", "lung_middle_lobe_right", "lung_upper_lobe_right"]
SEEN: dict[str, list[str]] = {
    "Adrenal gland": ["adrenal_gland_left", "adrenal_gland_right"],
    "Left adrenal gland": ["adrenal_gland_left"], "Right adrenal gland": ["adrenal_gland_right"],
    "Aorta": ["aorta"], "Bladder": ["urinary_bladder"], "Brain": ["brain"], "Colon": ["colon"],
    "Duodenum": ["duodenum"], "Esophagus": ["esophagus"], "Gallbladder": ["gallbladder"], "Heart": _HEART,
    "Inferior vena cava": ["inferior_vena_cava"], "Postcaval vein": ["inferior_vena_cava"],
    "Intestine": ["small_bowel"], "Small bowel": ["small_bowel"],
    "Kidney": ["kidney_left", "kidney_right"], "Left kidney": ["kidney_left"], "Right kidney": ["kidney_right"],
    "Left atrium": ["heart_atrium_left"], "Right atrium": ["heart_atrium_right"],
    "Left ventricle": ["heart_ventricle_left"], "Right ventricle": ["heart_ventricle_right"],
    "Myocardium": ["heart_myocardium"], "Left ventricular myocardium": ["heart_myocardium"],
    "Left hip": ["hip_left"], "Right hip": ["hip_right"],
    "Lung": _LEFT_LUNG + _RIGHT_LUNG, "Left lung": _LEFT_LUNG, "Right lung": _RIGHT_LUNG,
    "Liver": ["liver"], "Pancreas": ["pancreas"], "Spleen": ["spleen"], "Stomach": ["stomach"],
    "Sacrum": ["sacrum"], "Trachea": ["trachea"], "Pulmonary artery": ["pulmonary_artery"],
    "Portal and splenic veins": ["portal_vein_and_splenic_vein"],
    "Lumbar vertebra": [f"vertebrae_L{i}" for i in range(1, 6)],
    **{f"Vertebrae {level}{i}": [f"vertebrae_{level}{i}"]
       for level, count in (("C", 7), ("T", 12), ("L", 5)) for i in range(1, count + 1)},
}

UNSEEN = {
    # not among the 104 classes
    "Airway", "Anterior hippocampus", "Arytenoids", "Breast tissue", "Buccal mucosa", "Cerebellum", "Cerebral artery",
    "Cerebral ventricle", "Cochlea", "Coccyx", "Cricopharyngeal inlet", "Deep gray matter",
    "External cerebrospinal fluid", "Gray matter", "Hepatic vessels", "Inferior alveolar nerve", "Larynx",
    "Larynx glottis", "Larynx supraglottic", "Lips", "Mandible", "Optic chiasm", "Oral cavity", "Pharynx",
    "Pituitary gland", "Posterior hippocampus", "Prostate", "Prostate anterior fibromuscular stroma",
    "Prostate peripheral zone", "Prostate transition zone", "Prostate/Uterus", "Prostatic urethra", "Rectum",
    "Renal artery", "Renal vein", "Spinal cord", "Thyroid gland", "Uterus", "Vertebrae L6", "Vertebrae T13",
    "White matter", "Left anterior descending artery", "Left circumflex artery", "Right coronary artery",
    # parts of a class (see above)
    "Ascending aorta", "Brain stem", "Cervical esophagus", "Left femoral head", "Right femoral head", "Portal vein",
    *(f"{side} {part}" for side in ("Left", "Right") for part in (
        "anterior eyeball segment", "carotid artery", "cochlea", "crystalline lens", "eustachian tube", "eye",
        "hippocampus", "inner ear", "internal auditory canal", "lacrimal gland", "mandible", "mastoid", "middle ear",
        "optic nerve", "parotid gland", "posterior eyeball segment", "submandibular gland", "temporal lobe",
        "temporomandibular joint", "tympanic cavity", "vestibular semicircular canal")),
}

# --- Region, bone, vessel ------------------------------------------------------------------------------------------
# The authors' label categories that name a region; a dataset's region is the most frequent one among its labels.
CATEGORY_REGION = {"Head and Neck": "Head and Neck", "Thorax": "Thoracic", "Abdomen": "Abdominal",
                   "Pelvic": "Pelvic"}
# Structures missing from the authors' Bone / Vessel categories.
EXTRA_BONES = {"Coccyx"}
EXTRA_VESSELS = {"Portal and splenic veins", "Postcaval vein", "Renal vein"}

_BRAIN = "brain MRI; its labels are all lesions, which the authors' categories give no region"
# key -> (region, reason): where the labels give no region, or the wrong one.
REGION_DECISIONS = {
    "Task001_BrainTumour": ("Head and Neck", _BRAIN),
    "Task006_Lung": ("Thoracic", "lung cancer"),
    "Task010_Colon": ("Abdominal", "colon cancer"),
    "Task019_BraTS21": ("Head and Neck", _BRAIN),
    "Task040_ATM22": ("Thoracic", "the airway tree (trachea and bronchi) lies in the chest; the authors file "
                                  "'Airway' under Head and Neck"),
    "Task083_VerSe2020": ("Other", "the whole spine, cervical to lumbar, spans several regions"),
    "Task105_DICOM_LIDC_IDRI_Nodules": ("Thoracic", "lung nodules"),
    "Task106_AIIB2023": ("Thoracic", "the airway tree lies in the chest (as ATM22)"),
    "Task110_ISPY1-Tumor-SEG-Radiomics": ("Thoracic", "breast tumours; the authors file breast tissue under Thorax"),
    "Task111_LUAD-CT-Survival": ("Thoracic", "lung adenocarcinoma"),
    "Task115_QIBA-VolCT-1B": ("Thoracic", "lung tumours"),
    "Task166_LongitudinalMultipleSclerosisLesionSegmentation": ("Head and Neck", _BRAIN),
    "Task503_BraTs2015": ("Head and Neck", _BRAIN),
    "Task504_ATLAS": ("Head and Neck", _BRAIN),
    "Task601_CTSpine1K_Full": ("Other", "the whole spine, cervical to lumbar, spans several regions"),
    "Task612_CTPelvic1k": ("Pelvic", "pelvic bones (sacrum, hips) with the lumbar spine; the authors give these "
                                     "labels only the Bone and Spine categories"),
    "Task613_COVID-19-20": ("Thoracic", "COVID-19 lung lesions"),
    "Task615_Chest_CT_Scans_with_COVID-19": ("Thoracic", "COVID-19 lung lesions"),
    "Task616_LNDb": ("Thoracic", "lung nodules"),
    "Task630_StructSeg2019_subtask3": ("Thoracic", "lung cancer"),
    "Task631_StructSeg2019_subtask4": ("Head and Neck", "nasopharyngeal cancer"),
    "Task666_MESSEG": ("Head and Neck", _BRAIN),
    "Task700_SEG_A_2023": ("Other", "the whole aorta with its iliac branches spans chest, abdomen and pelvis"),
    "Task701_LNQ2023": ("Thoracic", "mediastinal lymph nodes"),
    "Task702_SegRap2023_Task2": ("Head and Neck", "nasopharyngeal carcinoma and its lymph nodes"),
    "Task703_TDSC-ABUS2023": ("Thoracic", "breast tumours (as I-SPY1)"),
    "Task710_autoPET": ("Other", "whole-body FDG-PET/CT; lesions anywhere in the body"),
    "Task711_autoPET_PET_only": ("Other", "whole-body FDG-PET/CT; lesions anywhere in the body"),
    "Task712_autoPET_CT_only": ("Other", "whole-body FDG-PET/CT; lesions anywhere in the body"),
    "Task720_HIE2023": ("Head and Neck", "neonatal brain MRI"),
    "Task894_BraTS2023_MET": ("Head and Neck", _BRAIN),
    "Task895_BraTS2023_SSA": ("Head and Neck", _BRAIN),
    "Task896_BraTS2023_PED": ("Head and Neck", _BRAIN),
    "Task898_BraTS2023_MEN": ("Head and Neck", _BRAIN),
    "Task899_BraTS2023_GLI": ("Head and Neck", _BRAIN),
}

# --- Sources and licences ------------------------------------------------------------------------------------------
# Only what we checked on the dataset's own pages; everything else stays "unknown".
_MSD = ("http://medicaldecathlon.com/", "CC BY-SA 4.0")
_AMOS = ("https://amos22.grand-challenge.org/", "unknown")
_SEGRAP = ("https://segrap2023.grand-challenge.org/", "unknown")
_AUTOPET = ("https://autopet.grand-challenge.org/", "unknown")
SOURCES = {
    **{key: _MSD for key in ("Task001_BrainTumour", "Task002_Heart", "Task003_Liver", "Task004_Hippocampus",
                             "Task005_Prostate", "Task006_Lung", "Task007_Pancreas", "Task008_HepaticVessel",
                             "Task009_Spleen", "Task010_Colon")},
    "Task020_AbdomenCT1K": ("https://github.com/JunMa11/AbdomenCT-1K", "unknown"),
    "Task021_KiTS2021": ("https://kits-challenge.org/kits21/", "CC BY-NC-SA 4.0"),
    "Task023_FLARE22": ("https://flare22.grand-challenge.org/", "unknown"),
    "Task037_CHAOS_Task_3_5_Variant1": ("https://chaos.grand-challenge.org/", "CC BY-NC-SA 4.0"),
    "Task041_ISLES2022": ("https://www.isles-challenge.org/", "unknown"),
    "Task044_KiTS23": ("https://kits-challenge.org/", "unknown"),
    "Task051_AMOS_CT": _AMOS, "Task052_AMOS_MR": _AMOS, "Task053_AMOS_Task2": _AMOS,
    "Task083_VerSe2020": ("https://github.com/anjany/verse", "CC BY-SA 4.0"),
    "Task105_DICOM_LIDC_IDRI_Nodules": ("https://wiki.cancerimagingarchive.net/display/Public/LIDC-IDRI",
                                        "CC BY 3.0"),
    "Task559_WORD": ("https://github.com/HiLab-git/WORD", "unknown"),
    "Task601_CTSpine1K_Full": ("https://github.com/MIRACLE-Center/CTSpine1K", "unknown"),
    "Task614_LUNA16": ("https://luna16.grand-challenge.org/", "CC BY 4.0"),
    "Task616_LNDb": ("https://lndb.grand-challenge.org/", "unknown"),
    "Task701_LNQ2023": ("https://lnqproject.org/challenge", "unknown"),
    "Task701_SegRap2023": _SEGRAP, "Task702_SegRap2023_Task2": _SEGRAP,
    "Task710_autoPET": _AUTOPET, "Task711_autoPET_PET_only": _AUTOPET, "Task712_autoPET_CT_only": _AUTOPET,
}

HEADER = """\
# The 87 SegBook datasets: the registry every grouping of the benchmark comes from.
#
# Schema (validated by segbook.registry; see docs/registry.md): one entry per dataset under `datasets`:
#   key           unique, the SegBook authors' task folder (TaskNNN_Name)
#   paper_task    the paper's number ("044", "051", "701", "702" each name two datasets)
#   name          display name (the paper's)
#   dataset_id    unique nnU-Net v2 id; the nnU-Net folder is Dataset{id:03d}_{key without TaskNNN_}
#   modality      CT | MRI | CT&PET | Ultrasound
#   channels      input channels in order (nnU-Net channel_names; "CT" selects CT normalisation)
#   target        the paper's category: Lesion | Seen Structure | Unseen Structure | Structure&Lesion
#   cases         the paper's case count (scale is derived from it: small < 100 <= medium < 400 <= large)
#   train_cases, test_cases   the fixed split published by the authors
#   region        Head and Neck | Thoracic | Abdominal | Pelvic | Limb | Other | unknown
#   bone, vessel  whether any structure label is a bone / a vessel
#   citation, source_url, licence   "unknown" where not known
#   reference_patch_size, reference_spacing   the authors' nnU-Net v1 3d_fullres plans
#   labels        index 0, 1, ... in order; kind background | structure | lesion; structures say whether they
#                 are seen (one of, or a union of, the 104 TotalSegmentator v1 classes listed in totalseg_classes)
#   notes         corrections of the published metadata and other remarks
#
# Derived once by scripts/build_registry.py from the paper's table and the authors' metadata; edit this file, not
# the script's output. Add your own datasets in your own file (--registry FILE or SEGBOOK_REGISTRY).
"""


def _read_categories(path: Path) -> dict[str, set[str]]:
    categories: dict[str, set[str]] = defaultdict(set)
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            categories[row["structure"]].add(row["category"])
    return categories


def _channel_name(published: str) -> str:
    """'T2 weighted MRI' -> 'T2 weighted': the modality says MRI already; a bare 'MRI' stays."""
    return published if published == "MRI" else published.removesuffix(" MRI")


def _label(key: str, index: int, published: str) -> tuple[dict[str, Any], str | None]:
    """The label entry, and why its published name was changed (None if it was not)."""
    cleaned = published.strip()
    name, reason = LABEL_FIXES.get((key, index), (NAME_FIXES.get(cleaned, cleaned), "spelling or spacing"))
    changed = reason if name != cleaned else None
    if index == 0:
        return {"index": 0, "name": "background", "kind": "background"}, changed
    if name in LESIONS:
        return {"index": index, "name": name, "kind": "lesion"}, changed
    if name in SEEN:
        return {"index": index, "name": name, "kind": "structure", "seen": True,
                "totalseg_classes": SEEN[name]}, changed
    if name in UNSEEN:
        return {"index": index, "name": name, "kind": "structure", "seen": False}, changed
    raise SystemExit(f"{key}: label {index} {name!r} is in none of LESIONS, SEEN, UNSEEN")


def _rename_notes(renames: list[tuple[int, str, str]]) -> list[str]:
    """One note per reason: which labels were renamed from what."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for index, published, reason in renames:
        by_reason[reason].append(f"{index} (was {published!r})")
    return [f"label{'s' if len(labels) > 1 else ''} {', '.join(labels)} renamed: {reason}"
            for reason, labels in by_reason.items()]


def _categories_of(label: dict[str, Any], published: dict[int, str], categories: dict[str, set[str]]) -> set[str]:
    """The authors' categories for a label, under its corrected name or else its published one."""
    return categories.get(label["name"]) or categories.get(published[label["index"]], set())


def _region(key: str, labels: list[dict[str, Any]], published: dict[int, str],
            categories: dict[str, set[str]]) -> str:
    votes = Counter(CATEGORY_REGION[c] for label in labels[1:] for c in _categories_of(label, published, categories)
                    if c in CATEGORY_REGION)
    ranked = votes.most_common(2)
    derived = ranked[0][0] if ranked and (len(ranked) == 1 or ranked[0][1] > ranked[1][1]) else None
    if key in REGION_DECISIONS:
        region = REGION_DECISIONS[key][0]
        if region == derived:
            raise SystemExit(f"{key}: REGION_DECISIONS repeats what the labels give ({region}); drop it")
        return region
    if derived is None:
        raise SystemExit(f"{key}: the labels give no region ({dict(votes)}); add a REGION_DECISIONS entry")
    return derived


def _has(labels: list[dict[str, Any]], published: dict[int, str], categories: dict[str, set[str]],
         wanted: set[str], extra: set[str]) -> bool:
    return any(label["kind"] == "structure" and (
        label["name"] in extra or _categories_of(label, published, categories) & wanted) for label in labels)


def build_entry(row: dict[str, str], categories: dict[str, set[str]]) -> dict[str, Any]:
    key = row["segbook_dataset"]
    published = {int(i): name for i, name in ast.literal_eval(row["labels"]).items()}
    built = [_label(key, i, published[i]) for i in sorted(published)]
    labels = [label for label, _ in built]
    notes = _rename_notes([(i, published[i], reason) for i, (_, reason) in enumerate(built) if reason])
    notes += [note for (k, _), note in LABEL_NOTES.items() if k == key]
    number = row["paper_task"].removeprefix("Task")
    dataset_id = DUPLICATE_IDS.get(key, int(number))
    if key in DUPLICATE_IDS:
        notes.append(f"the paper numbers two datasets {number}; this one has nnU-Net dataset id {dataset_id:03d}")
    if key in REGION_DECISIONS:
        notes.append(f"region {REGION_DECISIONS[key][0]}: {REGION_DECISIONS[key][1]}")
    url, licence = SOURCES.get(key, ("unknown", "unknown"))
    return {
        "key": key, "paper_task": number, "name": row["paper_name"], "dataset_id": dataset_id,
        "modality": row["modality"], "channels": [_channel_name(c) for c in row["channel_names"].split(",")],
        "target": row["target"], "cases": int(row["cases_paper"]),
        "train_cases": int(row["train_cases"]), "test_cases": int(row["test_cases"]),
        "region": _region(key, labels, published, categories),
        "bone": _has(labels, published, categories, {"Bone", "Spine"}, EXTRA_BONES),
        "vessel": _has(labels, published, categories, {"Vessel"}, EXTRA_VESSELS),
        "citation": row["citation"] or "unknown", "source_url": url, "licence": licence,
        "reference_patch_size": json.loads(row["patch_size"]),
        "reference_spacing": [round(s, 6) for s in json.loads(row["training_spacing"])],
        "notes": notes, "labels": labels,
    }


_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._()&/+-]*[A-Za-z0-9.)]")


def _scalar(value: Any) -> str:
    """A YAML scalar, quoted only where a plain one would be misread (as a number, a boolean, ...)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    plain = _PLAIN.fullmatch(value) and yaml.safe_load(value) == value
    return value if plain else json.dumps(value)


def _flow(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return _scalar(value)


def render(entries: list[dict[str, Any]]) -> str:
    lines = [HEADER, "datasets:"]
    for entry in entries:
        lines.append(f"  - key: {_scalar(entry['key'])}")
        for name, value in entry.items():
            if name in ("key", "labels", "notes"):
                continue
            lines.append(f"    {name}: {_flow(value)}")
        lines.append("    notes:" + ("" if entry["notes"] else " []"))
        lines += [f"      - {json.dumps(note)}" for note in entry["notes"]]
        lines.append("    labels:")
        lines += [f"      - {_flow(label)}" for label in entry["labels"]]
    return "\n".join(lines) + "\n"


def _check_classes() -> None:
    if not {c for classes in SEEN.values() for c in classes} <= TOTALSEG_V1_CLASSES:
        raise SystemExit("SEEN names a class that is not a TotalSegmentator v1 class")
    if set(SEEN) & UNSEEN or (set(SEEN) | UNSEEN) & LESIONS:
        raise SystemExit("a label name is in more than one of LESIONS, SEEN, UNSEEN")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--output", type=Path, default=ROOT / "dataset_registry.yaml")
    args = parser.parse_args()
    _check_classes()
    categories = _read_categories(args.data / "segbook_structure_categories.csv")
    with (args.data / "segbook_datasets.csv").open(newline="") as f:
        entries = [build_entry(row, categories) for row in csv.DictReader(f)]
    text = render(entries)
    if yaml.safe_load(text)["datasets"] != entries:
        raise SystemExit("the rendered YAML does not read back as the data it was made from")
    args.output.write_text(text, encoding="utf-8")
    print(f"{len(read_registry_file(args.output))} entries written to {args.output} and validated")


if __name__ == "__main__":
    main()
