"""Rules: the rule-file model and its checks, hash banks, and the indexes hashes are looked up in.

``model`` is the rule file, ``check`` the ``rules check`` command, ``index`` the mean-hash rule
index; banks (named hash lists in Redis), their import/export formats and the PDQ/mean-hash
range indexes live beside them.
"""
