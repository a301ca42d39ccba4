"""rtjax: personalised glioma radiotherapy target volumes with a differentiable growth model."""

__version__ = "0.1.0"

__all__ = ["__version__"]
