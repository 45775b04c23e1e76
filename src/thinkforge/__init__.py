"""thinkforge: the Phi-4-Mini-Reasoning training recipe as a Kubeflow Pipelines platform."""

__version__ = "0.1.0"
