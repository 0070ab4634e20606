"""Synthetic demo data in the official COCO, DOTA-v1.0 and ADE20K layouts.

`install.ensure_demo_data()` writes, once, a small seeded dataset into a folder of its own
(`<cache root>/demo-v1`, the cache root being `ptqbench.paths.cache_root()`):

    coco/annotations/instances_{val2017,train2017}.json    coco/{val2017,train2017}/*.jpg
    DOTA/{val,train}/images/*.png                          DOTA/{val,train}/labelTxt/*.txt
    ADEChallengeData2016/images/{validation,training}/*.jpg
    ADEChallengeData2016/annotations/{validation,training}/*.png     (uint8, ADE ids 0..150)
    ADEChallengeData2016/ptqbench_priors/{validation,training}/*.png (uint8, 0..149, 255 none)

so that every loader and evaluator runs on the same code path as on real data.

Modules, one concept each:

- `install`: the cached installer (marker, lock, temporary folder renamed into place);
- `writers`: `DemoSizes` and the writers of the three official layouts, one seeded random
  stream per image;
- `drawing`: polygons, rasterisation, textures and the finishing of an image;
- `coco_scenes`, `aerial_scenes`, `ade20k_scenes`: the three scene families
  (`object_scene`, `aerial_scene`, `region_scene`, public so that a training script can draw
  fresh scenes from the same distributions);
- `ade20k_priors`: imperfect semantic-segmenter outputs for the ADE20K scenes.
"""
