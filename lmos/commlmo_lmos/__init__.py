"""commlmo's built-in LMOs and learning-rate rules.

They register through the ``commlmo.lmos`` and ``commlmo.lr_rules`` entry points
like any third-party plugin; importing this package imports none of them.

* :mod:`.spectral` -- ``spectral`` (polar factor, Muon) over :mod:`.newton_schulz`;
* :mod:`.sign` -- ``sign`` (max-norm ball);
* :mod:`.norms` -- ``colnorm``, ``rownorm``, ``bias_rms``, ``euclidean`` (Scion's norms);
* :mod:`.lr_rules` -- ``constant``, ``original``, ``match_rms_adamw``, ``unit_gain``,
  ``scion``, ``gluon``.
"""
