"""The model library: the checkpoint layer, CLIP loading, the region encoder, the RPN, the detector and
their geometry.

Nothing here knows about run manifests or the command line; stages/ turns a manifest into the
paths and settings these functions take.
"""
