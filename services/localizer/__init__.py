"""The localizer: ICE stage 1, automatic concept localization (retriever, DiffSeg segmentor, removal loop)."""
