"""``prep-agent distribute``: the institute delivers every signed cut to every difusor.

``local`` checks a cut with the difusores' own core before anything leaves,
keeping the bytes it verified in ``snapshot``, the store every target is sent from;
``transport`` is one target's OpenSSH link (pinned host key, multiplexing,
``sftp -b``); ``scheduler`` runs every target in parallel with retries and
supersession; ``command`` is the command line's loop (one cut, or ``--watch``).
"""
