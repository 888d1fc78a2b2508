"""Applications on top of the stages: the demo (the whole loop on a laptop) and the scaling-law
experiments. Nothing below imports from here."""
