"""ksa_rec: long-sequence recommendation with Kwai Summary Attention.

Import the pieces you need from their modules (``ksa_rec.ops``, ``ksa_rec.data``, ``ksa_rec.models``,
``ksa_rec.training``, ``ksa_rec.serving``); this top level has no import-time side effects.
"""

__version__ = "0.1.0"
