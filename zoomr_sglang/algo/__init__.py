"""Pure-torch ZoomR algorithms: segmentation, index keys, voting, working sets."""
