"""The pyro-lvm model zoo: one file per model family, each written as a user writes their own.

pyro-lvm loads these files by path (``pyro-lvm fit vae``); they are installed as ``pyro_lvm.zoo``.
"""
