"""A toy-scale subject world for testing MUSAR's claim on a CPU (issue 9).

``world`` draws subjects (shape x colour x pattern) in scenes and writes their text; ``detector``
reads rendered or generated images back; ``measure`` turns detections into subject fidelity and
entanglement; ``subject200k`` writes single-subject customisation data in Subject200K's format.
"""
