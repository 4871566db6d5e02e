"""``prep-agent rehearse``: a whole election night on one machine, with faults.

The rehearsal runs the real commands (``prep-agent simulate``, ``distribute``,
``collector``, ``run``, ``report``) as processes, one real ``sshd`` per
difusor, and follows every difusor's public copy like a frame does. It imports
only ``core`` and ``shared``: what it checks is what an outsider sees.
"""
