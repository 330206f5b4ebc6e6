"""Built-in aggregators of commlmo: mean, majority vote, EF21 (and the EF21-P downlink).

Registered through the ``commlmo.aggregators`` (and ``commlmo.compressors`` for
``ef21p``) entry points, exactly as a third-party plugin would be.
"""
