"""A simulated electoral institute that publishes PREP cuts (``prep-agent simulate``).

The institute of a realistic but entirely fictitious PREP: Coahuila's 2021
ayuntamientos election (its 38 real municipalities, about 3,800 actas, invented
votes). Every cut is a small static results site in Spanish plus the PREP CSV
database in the real INE/OPLE layout and its delivery zip; it is signed with
:func:`prep_agent.institute.sign.sign_folder` and delivered into the difusor's
drop folder, locally or with the OpenSSH ``sftp`` client
(:mod:`prep_agent.institute.delivery`), in the institute's upload order (changed
files, the manifest, the signature last; prep-cut-v1 §1.2).

A cut is a pure function of the seed, its sequence and its cut time, so the
same cut can be rebuilt byte for byte; the set of captured actas only grows
with the sequence; static assets (CSS, logo) are identical in every cut, so
the agent reuses them instead of copying them again (§4.5).

Modules, each using only those before it: ``election`` (municipalities,
casillas, actas and votes drawn from the seed), ``count`` (the actas a cut
shows, their tallies, the cut stamp), ``database`` (the PREP CSV and the
delivery zip), ``site`` (the HTML pages and the whole tree of a cut:
:func:`~prep_agent.institute.simulation.site.build_cut`), ``run`` (a cut every
interval, and the command).
"""
