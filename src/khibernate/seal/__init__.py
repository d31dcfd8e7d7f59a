"""Sealed images: the AEAD of a sealed ``.khi`` (:mod:`.cipher`), the wrapped store keys (:mod:`.keyring`, one format)
and where a key comes from (:mod:`.keysource`: a key file, a passphrase; the TPM is the next source)."""
