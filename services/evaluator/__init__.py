"""The ICE evaluator: UCE concept metrics (SIM^I, SIM^C, ACC^1, ACC^3 with CLIP and DINO) and mask metrics."""
