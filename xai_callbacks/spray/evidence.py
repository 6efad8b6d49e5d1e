"""Causal evidence for SpRAy strategies: which samples rely on something that carries their class?

SpRAy's clusters show how a class is recognised; whether a strategy is a Clever-Hans shortcut
is decided here by intervening on the inputs rather than by the shape of the heatmaps. A
shortcut is something part of a class carries that makes other classes' samples look
like the class far better than what the rest of the class carries. For each analysed sample
``i`` of class ``c`` (:func:`sample_evidence`):

1. **Components.** Up to four parts of ``i`` (six with the tone and the shading) are transferred
   (:func:`transfer`) into ``pastes`` samples of other classes that the model does not give ``c``
   (drawn from the class's pool of ``2 * pastes`` partners): its **region** (where its
   relevance distribution exceeds the per-position median of its class most: a stamp, tags, a
   frame, a patch; the median is the typical sample up to 50 % prevalence and cancels what every
   heatmap of the class shares, such as the LRP bias towards the top-left corner of small
   ResNet inputs; an eighth and a thirty-second of the input by default, each share on its own),
   its fine **detail** (a high-frequency watermark, a texture), on RGB images its colour
   **saturation** (grey images among colour ones), its **border**, the outer sixteenth of each
   side (a frame, a margin), a region no heatmap has to find, and, where asked for (they are not
   among :data:`DEFAULT_COMPONENTS`), its per-channel **tone** (a colour or brightness shift) and
   its **shading**, the coarse brightness over the input (a vignette, uneven light).
   Detail, tone, saturation and shading have no region: the heatmaps cannot point at them, the
   intervention can.
2. **Control.** As the class's samples go into the same pool, each partner has its control at no
   further cost: the lower quartile (:data:`CONTROL`) of the class probability that the class's
   samples that went into it (about half of the class) give it with their same component (for
   the region each sample's own region, the most relevant part of a sample of the class as
   well), and ``excess`` is the median over ``i``'s partners of the class probability with
   ``i``'s component minus that. The lower quartile stays typical of the class while up to three
   quarters of those samples share ``i``'s shortcut. The region (and the border) has a second control, for its place:
   per partner a class mate's content through ``i``'s region (the upper quartile over partners of
   the difference), and its ``excess`` is the smaller of the two; it is measured only where the
   first excess reaches ``min_rise``, as no other sample can be confirmed. What all of the class carries
   (the object, the class's texture, the most relevant part of any of its samples, what any of
   its samples has at that place) cancels; a shortcut does not.
   Measured in stages (:data:`SCREEN`): every sample's components go into the first of its
   partners, as few as give each partner of its class's pool :data:`STAGE_MATES` of the class's
   samples (2 of 8 at 48 or more samples per class, half of them below 32; the tone, the
   saturation and the shading into a quarter, :data:`WHOLE`); a class's check goes on into the
   rest where those excesses come near a confirmed group, and into the rest of its class's pool
   where the group then stands near its threshold, its place controls applied (:data:`RECHECK`).
3. **Removal** (reported, not decided on): the region is removed through an infiller (blur by
   default; the GAN inpainter when one is trained keeps the removal in-distribution) and
   ``drop`` is the fall of the class probability.
4. **Decision.** Per class and component, the excesses are sorted and the top group best
   separated from the rest is found (:func:`separated_group`: the gap to the rest in units of
   the rest's robust spread). The group is **confirmed** when its separation reaches
   ``min_separation``, every member's excess reaches ``min_rise`` (scaled with a region's side)
   and it holds at least ``min_members`` samples and is not credibly more than ``max_share`` (half)
   of the class (:func:`group_sizes`: 27 of 50 analysed samples, 14 of 25); a group that is not
   credibly less than half (more than 22 of 50) may be the class's own majority strategy and must
   stand apart :data:`MAJORITY_SEPARATION` times as far. A group of a change of the whole input
   (the tone, the saturation, the shading) must not be credibly more than half of the samples of
   its class that no placed check confirms (:data:`WHOLE`): a stamp changes the colour of the
   samples it is on. A shortcut is a discrete
   thing a sample has or has not, so its group stands apart; a graded feature of the data (how
   much ink a digit has, how typical a texture is) forms a tail without a gap and is not confirmed.
   A tail can still show a gap by chance, the one draw of partners lifting a few samples of it;
   so the group must stand apart as far on partners it was not chosen on
   (:func:`held_out_separation`: chosen on half of the partners, its members' lower quartile
   against the rest's upper quartile on the other half). A group found through a region larger
   than the smallest must also be concentrated (:data:`COMPACT`): the most relevant half of its
   members' regions transfers at least half of what the whole does. A stamp is a small thing; a
   pale sky that only one class's photo has carries the class by its extent. A group found through
   its region, its fine detail or its border must share one fine pattern there, more than its class
   mates do (:data:`SHARED`, :func:`shared_detail`): a stamp, a caption, a frame or a watermark is
   the same pattern in each image it is on, a class's own texture or sky is not.
5. **Search.** A class with a confirmed region group is searched for more of the same
   (``search``): in each of its samples the part that best matches a member's region content
   (least squares over every circular shift of the sample) is pasted into the sample's partners
   through that member's region, against the same done with the class's other samples. The group
   this confirms (by the rules above) joins the class's confirmed samples where it holds at least
   half of the members: a tag the model reads weakly where some samples have it (ResNet-18 reads
   the bottom-right corner of a 32-pixel input weakly) or a stamp on a sample whose relevance lies
   elsewhere is found by what it carries. It adds samples only to classes already confirmed.
6. **What most of a class carries** (``class_area``). A stamp on most or all of a class is part of
   its median and cancels in every comparison above. So each sample also has a region measured
   against the other classes, where its relevance most exceeds their mean (:data:`CLASS_AREA`, an
   eighth), and its content there, and in its border, is pasted into its partners against the
   content of a sample of another class in the same place. A class is confirmed where a group of
   its samples credibly more than half of it reaches the rise asked (:data:`OVER_OTHERS_RISE`),
   those samples being the confirmed ones (:func:`_whole_class`), where they share one fine pattern
   there more than the other classes' samples do (:data:`SHARED`: a pale sky on all of a class's
   photos does not). What a class shows in the same place in every sample for its own sake (an
   aligned object) transfers so too, where it fits in an eighth: the check cannot tell it from a
   stamp, and tabular rows and token ids go without it (:data:`ROW_EVIDENCE`).
   :meth:`~xai_callbacks.spray.core.SpRAyResult.confirm` makes a class's confirmed samples its
   flagged strategy.

The thresholds are calibrated on ``benchmarks/shortcuts.py`` (the kinds of shortcut and clean
controls on textures, scenes and digits; the small CNN over three seeds, ResNet-18 and VGG-11-BN;
32 and 64 pixels), not on one scenario; the README gives the figures, what is missed (colour
shifts on varied photos, class-specific backgrounds) and what is flagged though nothing was planted
(natural groups of a class's own crops on weak ShuffleNetV2 and DenseNet-121 models, architectures
the calibration never saw). Token ids and tabular rows have settings of their own
(:data:`ROW_EVIDENCE`, calibrated on ``benchmarks/row_shortcuts.py``).

Cost: ``passes`` counts the model evaluations per sample (``forward_passes`` their sum): itself
(all classes' probabilities at once; none where ``probabilities`` are given, as the callback
does), its removal, the first stage's transfers per check (the region at each area, the border and
the detail: from a quarter to half of ``pastes``, :data:`STAGE_MATES`; a quarter for the tone, the
saturation and the shading), the rest of ``pastes`` for the checks of its class that come near a
confirmed group (about 15 % of them on the benchmark) and the rest of its class's pool where one then
stands near its threshold (:data:`RECHECK`), ``pastes`` place controls per area and for the border
where its excess reaches ``min_rise``, ``pastes`` for the concentration of a member of a group through a
larger region that is confirmed otherwise (:data:`COMPACT`), ``pastes`` for the search where its class has a
confirmed region group, and about 2 for what most of a class carries. With the defaults, over the 40 models of the
benchmark's main table and four draws of partners (2026-12-06 evening, as the callback counts them):
13-24 on its clean controls, 15-34 on its shortcut models, with the tone, a default then (without it,
2026-12-07 late, 21.5 instead of 25.5 on average over 28 benchmark commands replayed); one more
without ``probabilities``. All
batched on the model's device under :func:`xai_callbacks.guard.model_guard` (and split across
processes with ``shard``, as ``SpRAyCallback`` does across DDP ranks). No Lightning, no W&B here.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F

from ..attribution import model_device
from ..guard import model_guard, unwrap_model
from ..infill import Infiller, gaussian_blur, get_infiller
from ..scoring import check_class_target, class_probabilities, class_scores, score_perturbed
from .suspicion import positive_part

__all__ = ["SampleEvidence", "StrategyEvidence", "sample_evidence", "separated_group", "held_out_separation",
           "group_sizes", "relevance_regions", "shared_detail", "transfer", "AREAS", "COMPACT", "COMPONENTS",
           "DEFAULT_COMPONENTS", "MIN_SEPARATION", "MIN_RISE", "SCREEN", "SHARED", "STAGE_MATES", "RECHECK", "WHOLE",
           "SHARE_Z", "MAJORITY_SEPARATION", "BORDER", "border_mask", "ROW_EVIDENCE", "CONTROL"]

#: What the evidence can transfer from a sample into other classes' samples (see :func:`transfer`).
COMPONENTS = ("region", "detail", "tone", "saturation", "shading", "border")
#: What :func:`sample_evidence` checks unless told: all but the tone and the shading.
#: The tone catches a colour shift on crops of one texture per class (the benchmark's textures:
#: the small CNN, ResNet-18 on one of two trainings, VGG-11-BN, ResNet-50, the 64-pixel CNN;
#: separations 21-70, threshold 10) and a few other kinds where they shift a sample's mean colour
#: (VGG-11-BN's texture background, 12.1; a coloured frame without the ambiguity, 20.9), but a
#: class's own colour carries the class as a shift does: on photos the check was never calibrated
#: on (2026-12-07, 37 benchmark commands replayed on cached weights with and without it) it
#: confirmed natural groups in 2 of 20 clean ResNet-18 controls (a photo's pale sky, a flower's
#: colour; 10.5 and 12.2), in classes without a planted shortcut of two shortcut models (four more
#: on seed 9's photos, the one colour photo among grey ones), and, without the benchmark's
#: ambiguity, in clean VGG-11-BN and ResNet-18 controls; where the classes' photos differ in colour,
#: a model learns their colour. The shading catches a vignette (the benchmark's texture CNN and VGG-11-BN,
#: separations 10.7 and 10.6; not ResNet-18's, 4.1) but where an object's brightness is its shape
#: carries the object itself: on the clean digits ResNet-18 it confirmed a natural group of 1s
#: (separation 29.5). ``components=(*DEFAULT_COMPONENTS, "tone")`` (or ``"shading"``) adds one
#: where a colour cast (uneven light, a lens) is the suspected shortcut and the classes' own
#: colours are alike. See docs/causal-evidence.md, "The tone, asked for".
DEFAULT_COMPONENTS = ("region", "detail", "saturation", "border")
#: The ``border`` component's width, a share of each side of the input (a side of fewer than 16
#: positions, as the row of a one-row image, has none): the benchmark's frames (the same
#: width) and a vignette's darkest part. The relevance region of an eighth holds only part of a
#: frame (about half of a 2-pixel frame at 32 pixels); the border pastes all of it.
BORDER = 1 / 16

#: The region's shares of the input, each checked on its own: an eighth (a stamp, tags, a patch or
#: half a frame at 32 pixels) and a thirty-second (a small stamp or tag on a larger input, where an
#: eighth around it holds so much of the photo that a class mate's eighth transfers almost as well:
#: on 64-pixel scene crops, two draws of analysed crops, a 12x12 stamp's eighth stood apart by 0.5,
#: its thirty-second by 2.1 and 6.1; the threshold is 4). Over 95 benchmark models (two draws each)
#: the thirty-second added 14 of 144 planted shortcut classes to the eighth's 52 and no flag: in the
#: classes without a planted shortcut its largest separation was 1.6.
AREAS = (1 / 8, 1 / 32)

#: Separation a confirmed group reaches, per component. Calibrated on 62 benchmark models (three
#: architectures; textures and scenes; 32 and 64 pixels; 199 classes without a planted shortcut):
#: those classes' largest separations were 3.0 for a region, 1.8 for the detail and 4.0 for the tone
#: (6.5 over other draws: a photo class's own colours vary, a few light-grey crops of a suit
#: stand apart), the weakest shortcuts caught by one component alone 5.8 (region), 4.5 (detail) and
#: 48 (tone). The saturation's is the tone's (a global property a photo class's crops vary in):
#: over 18 benchmark models (10 on colour photos; small CNN and ResNet-18) every class without a
#: planted grey share stayed below 1; the small CNN's grey crops of a scene class stood at 29.
#: With the controls taken from the class's own transfers (one draw over 97 benchmark models) the
#: classes without a planted shortcut stayed below 0.45 of these thresholds. The border's is the
#: region's: it is a region, of a fixed place.
MIN_SEPARATION = MappingProxyType({"region": 4.0, "detail": 3.0, "tone": 10.0, "saturation": 10.0, "shading": 10.0,
                                   "border": 4.0})
#: The check's settings for tabular rows and token ids (N, L) (``SpRAyCallback`` uses them unless its
#: ``evidence_options`` say otherwise): the region alone, as fine detail, tone, saturation, shading
#: and a border mean nothing for a row of features or tokens (nor does a region's shared fine
#: pattern, ``shared`` 0); every position on its own
#: (``smooth`` 1), as neighbouring features are unrelated and a single token may decide; no search,
#: as a row shifted no longer holds the same features; no check of what most of a class carries
#: (``class_area`` 0), as a class's most relevant features carry it into other rows for their own
#: sake (on the tests' analytic rows without a shortcut, where each class raises three of its own
#: four features, the three classes came to 0.90-1.22 of the rise asked with gradient x input
#: regions, and one was flagged); and a region's group must stand apart 3
#: times as far as on images. Calibrated on ``benchmarks/row_shortcuts.py`` (six seeds; an MLP on
#: scikit-learn's breast-cancer table and on its digits as rows of 64 pixels, a leak column and a
#: sentinel value; a bag of embeddings and a small transformer on NumPy's docstrings, a tag word and
#: a trigger word): with the images' threshold, natural groups of the clean digits rows (a few 7s
#: whose top stroke carries the class into other digits) flagged two of three controls (1.19 and
#: 1.86 of it); at 2.5 times a clean text transformer's class came to 0.97 (a topic word carries its
#: class as a planted one does); at 3 times the closest of the 24 clean controls stood at 0.81 and 20
#: of the 45 shortcut models that used their shortcut were caught (22 at 2.5). The callback takes the
#: regions of rows from the heatmaps of its ``method`` and removes a row's region with 0
#: (``constant``: the padding id of most tokenizers, the mean of standardised features) where its
#: infiller is the default blur.
ROW_EVIDENCE = MappingProxyType({"components": ("region",), "smooth": 1, "search": False, "class_area": 0,
                                 "shared": 0, "min_separation": {"region": 3 * MIN_SEPARATION["region"]}})
#: Excess every member of a confirmed group reaches (probability units), for an eighth of the input
#: and the global components; a region of share ``a`` is asked ``MIN_RISE * sqrt(8 a)`` (in
#: proportion to its side: 0.1 for a thirty-second), as less of the input carries less of a class.
#: At 0.1 for an eighth, six 3s of a clean digits ResNet-18 were confirmed (0.17 to 0.46): their
#: region makes other digits 3s, a natural group an intervention cannot tell from a stamp.
MIN_RISE = 0.2
#: How concentrated a region group's evidence must be (``compact``). A group found through a region
#: larger than the smallest of ``area`` (the eighth of :data:`AREAS`) is confirmed only where the most
#: relevant half of its members' regions raises their partners' class probability by at least
#: ``compact / 2`` times what the whole regions do (the medians over the members, on their first
#: ``pastes`` partners; ``pastes`` passes per member, only for a group that is confirmed otherwise):
#: as much per unit of area. A stamp, a tag, a patch or a caption is a small thing: the half holds
#: most of it and transfers about as well (over the benchmark's cached ResNet-18s, 0.54-1.00 of the
#: whole). A class's own content that only part of the class shows, such as a pale sky or a bright
#: background that only one photo has, carries the class by its extent: half of it transfers far
#: less (0.02-0.48), though to an intervention the whole is what a stamp is. A frame is extended
#: too (0.10): the ``border`` component pastes it whole. 0: not asked. See
#: docs/causal-evidence.md, "Concentrated evidence".
COMPACT = 1.0
#: How much more a group confirmed by its ``detail``, its ``region`` or its ``border`` must share one
#: fine pattern (in its members' regions, or the border) than its class mates do, and a class that
#: what most of it carries confirms (``class_area``) than the other classes' samples do (``shared``;
#: :func:`shared_detail`: the largest cross-correlation of two samples' fine details over every shift,
#: the members' median less the others'). A watermark, a caption, a stamp, a frame, a stripe patch, a
#: marker, any pattern added at one place or anywhere, is the same pattern in each image it is on:
#: 0.06-0.85 over 684 of 685 planted groups of the benchmark's replayed commands (markers 0.09-0.34),
#: 0.06-0.84 over 33 classes carrying one on 70-100 % of their crops (a uniform grey edge bar the
#: lowest). A class's own texture or sky is not, or no more than its class mates' content (-0.06 to
#: 0.03 over 18 natural groups there; -0.02 to 0.09 over 13 classes confirmed by what they carry where
#: half or more of those crops are the class's own), though a model that reads it gives the class to
#: any sample with the members' kind of detail or content, as it would for a watermark or a stamp. A
#: shortcut without fine detail or edges (a soft blob of light on textured photos, a vignette) is then
#: missed: the fine detail in its region is the photo's. 0: not asked (token ids and tabular rows,
#: :data:`ROW_EVIDENCE`). See docs/causal-evidence.md, "A shared fine pattern".
SHARED = 0.05
#: The quantile of what a class's samples that went into a partner give it with their same component
#: that is the partner's control (``control``): the lower quartile, typical of the class while up to
#: three quarters of its samples share a shortcut; every threshold here was calibrated with it. Where
#: a quarter or more of a class shows other content (the benchmark's ambiguity puts 40 % of each
#: class's crops on other classes' photos), the lower quartile is that content's, and part of the
#: class's own content can stand apart from it as a shortcut does (six crops of a photo's bright
#: background beside the stamped ones, purity 0.68). Over 110 benchmark models (2026-12-07) 0.4 made
#: that stamp pure and unflagged two of five natural groups, but lost three caught shortcuts and a
#: gated one; 1/3 made it pure and lost two (docs/shortcut-benchmark.md, "a higher control quantile").
CONTROL = 0.25
#: The evidence is measured in two stages: every sample's components go into the first of its
#: ``pastes`` partners (half of them until 2026-12-06, now :data:`STAGE_MATES`); a class's check
#: goes on into the others only where the best-separated group of those stage-one excesses
#: (members at half the check's rise) reaches this share of the check's ``min_separation``. A
#: class's check is decided on all ``pastes`` or not at all, never on a mix (excesses of two
#: precisions side by side make gaps of their own). Offline over 98 benchmark models (every
#: sample's 8 transfers per check stored, the stages replayed on their first 4): every decision
#: stayed and 18 % of the classes' checks went on; of the 55 classes with a confirmed group the
#: weakest's best check stood at 0.27 of its threshold after the first stage (the scene
#: ResNet-18's tags, recall 0.58), the next at 1.0. A quarter of the pastes first also kept every
#: decision there at 50 samples per class, but with a few class mates per partner its controls
#: fail on smaller classes (hence :data:`STAGE_MATES`).
SCREEN = 0.1
#: A class's check whose group, measured on all ``pastes`` partners with its place controls applied
#: (what decides), stands within this range of its threshold (its separation over
#: ``min_separation``) is measured on the other ``pastes`` of its class's pool as well and decided
#: on all of them (stage three): every sample of the class then goes into every partner of the
#: pool, each partner's control is the whole class's, and each half held out
#: (:func:`held_out_separation`) has ``pastes`` partners. Near its threshold one draw of
#: partners decides a class: over four draws (``seed`` 0-3) of the 40 cached models of the
#: benchmark's main table (2026-12-06, a scratch run), two classes without a planted shortcut came
#: to 1.13 and 1.01 of it on one draw each; with this stage to 0.88 at most, but for one group whose
#: region transfers as a stamp's would on every draw (0.96 on average, 1.24 on one draw), and weak
#: shortcuts were caught on more draws. The benchmark's tables kept every cell, at 0-6 passes per
#: sample more. Until 2026-12-06 evening the range was read before the place controls: a group
#: above twice its threshold that its controls brought near it was decided on one draw (over the
#: four draws of those 40 models and 22 more clean controls, the change moved three classes'
#: ratios, none across 1).
RECHECK = (0.5, 2.0)
#: The class mates each partner takes on average in the first stage (:data:`SCREEN`) of the region,
#: the border and the detail: a class's samples go into as few of their ``pastes`` partners as give
#: each partner of the class's pool this many, a quarter of them at the fewest and half at the
#: most; with the defaults 2 of 8 at 48 or more samples per class, 3 at 32-47, 4 below. A
#: partner's control is the lower quartile of its mates' transfers, and half of 8 partners gave
#: each about 6 at 25 samples per class, where the two stages were calibrated; a quarter of them
#: there lost a watermark (:data:`WHOLE`). Only the first stage changes: a class's check that goes
#: on is decided on the same partners as before. Over the 40 models of the benchmark's main table
#: and four draws of partners (``seed`` 0-3; 2026-12-06 evening), against half of the partners
#: first: every recall, purity, flag and gate the same, 13-34 passes per sample instead of 21-40
#: (22.1 instead of 29.1 on average); on draw 0 the checks that confirm stood at 0.80 of their
#: threshold or more after the first stage (0.44 before; the screen asks 0.1). The classes whose
#: best group it now leaves after the first stage had come to 0.76 of their threshold at most (a
#: scene ResNet-18's colour-shift class by its region, on one draw; the rest 0.48 at most). On
#: ``benchmarks/row_shortcuts.py`` (seeds 0-2, 36 models) every cell the same as well, at 12.0
#: passes per sample instead of 15.3.
STAGE_MATES = 6
#: The components that change the whole input (its colour, its brightness). Their stage one goes into
#: a quarter of the pastes, as they are confirmed only where a group stands far apart (a threshold
#: of 10). Replayed over 116 benchmark models: every decision stayed at 50, 35 and 25 samples per
#: class (two draws), at 21.4 instead of 24.4 passes per sample; a quarter for the detail as well
#: (19.7) lost a ResNet-18 watermark at 25 per class, where a quarter of the pastes leaves a partner
#: too few class mates.
#: And a group of theirs must not be credibly more than ``max_share`` of the samples of its class
#: that no placed check (the region, the border) confirms: a stamp, a tag or a frame changes the
#: colour and the brightness of the samples it is on, which then no longer show the class's own look.
#: On the benchmark's seed-32 photos the shortcut class's own photo (``text``) is grey; coloured
#: tags or a coloured frame on 14 of the class's 50 crops left its 26 grey crops a minority of the
#: class (a group of 26 of 50 may stand apart, twice as far, :data:`MAJORITY_SEPARATION`), and the
#: small CNNs' saturation confirmed them beside the planted ones (purity 0.35); they are 26 of the
#: other 36, the class's own look.
WHOLE = ("tone", "saturation", "shading")
#: The share of the input of a sample's region over the other classes (:func:`_over_other_classes`),
#: where what most of a class carries is looked for (:func:`_whole_class`): the region check's eighth,
#: the size of a stamp, a tag or a logo at 32 pixels. Larger, it holds what a class shows at one
#: place in every sample for its own sake (the tests' bright half of an image), which transfers as
#: a shortcut does. Calibrated with :data:`OVER_OTHERS_RISE`.
CLASS_AREA = 1 / 8
#: The rise asked of a class's samples through their regions over the other classes
#: (:func:`_whole_class`), as a multiple of a region's (:data:`MIN_RISE` for an eighth). Chosen
#: where each sample's relevance most exceeds the other classes', the region holds the sample's
#: own evidence for its class, which carries the class into other samples for its own sake. Over
#: 245 cached benchmark models (2026-12-06, a scratch scan: the first 50 validation samples per
#: class; small CNN, ResNet-18, VGG-11-BN, CIFAR-style ResNet-18 and five torchvision architectures
#: as they come; textures, scenes, other photos and digits at 32, 64 and 96 pixels), in a region's
#: rise: the 745 classes without a planted shortcut came to 0.72 at most; three classes with a
#: shortcut on 30 % of them to 1.06-1.15, with 28-31 samples of which about half carried it (the
#: carriers' transfers and the others' own content; the next 0.74); the shortcuts on 70 % or all of
#: a class that the models used to make the class (stamp, tags, frame, patch, logo, caption, line,
#: marker; pasting them moves half or more of other crops into the class) to 1.63-5.0, those read
#: weakly to 0.89 at most. 1.5 leaves those three at 0.71-0.76 and kept every catch of the
#: benchmark's tables.
OVER_OTHERS_RISE = 1.5
#: The partners every other sample of a class goes into first through its region over the other
#: classes and its border (:func:`_whole_class`), each with the place's control; their median
#: decides whether the class goes on, every sample into all of them (where it reaches half the rise
#: asked). Without the control, classes of two ResNet-18s without a shortcut (a clean one's, a
#: stamp model's other class) came to 0.84-0.95 of the rise, with it to 0.25-0.39 (pasting anything
#: there takes evidence from a partner); they went on, and the check cost 5.8 passes per sample
#: more instead of 2 (the benchmark's cost runs, 2026-12-06).
CLASS_SCREEN = 1
#: z of the one-sided bounds :func:`group_sizes` puts on a group's share of its class (the
#: normal's upper quartile). With few analysed samples a class's own majority can fall below half
#: of them by chance and stand apart as a group (in the benchmark a class whose tone or texture
#: its own crops carry, beside the crops showing other classes' photos). Offline over 116
#: benchmark models with every class subsampled, a group bounded to half of the class flagged
#: classes without a planted shortcut 9 times at 25 samples per class (three draws), bounded by
#: the upper quartile of its share 2 times; with z = 1 4 to 5 caught shortcut classes were lost.
SHARE_Z = 0.6745
#: How much further apart a group must stand (its separation is divided by this) where it is not
#: credibly less than half of its class (the upper quartile of its share is half or more: more than
#: 22 of 50 analysed samples, 10 of 25): it may be the class's own majority strategy, as it may be a
#: shortcut carried by up to half of the class (the benchmark plants them in 10-50 %). Over the
#: benchmark's cached models (2026-12-05; 142 models at 50 samples per class, 99 at 25; every
#: check stored, the decision replayed): the groups of that size in classes without a planted
#: shortcut stood at 1.04-1.46 of their threshold (34 of 50 crops of the moon texture by their fine
#: detail, 28 of 50 of the Hubble deep field by their tone: the class's own photo beside other
#: classes'), the shortcuts on half of their class that the textures' small CNN and ResNet-18 used
#: at 2.2-6.2 (stamp, tags, frame, watermark, colour shift). Until 2026-12-05 such groups were
#: refused, and 8 of those 10 models were missed or caught in part; now 6 more shortcut models are
#: caught at 50 per class and 7 at 25, and no flag is added.
MAJORITY_SEPARATION = 2.0


def _distribution(heatmaps: torch.Tensor, spatial: int) -> torch.Tensor:
    """(N, *S) positive channel-summed relevance scaled to sum 1 (``|R|`` where none is positive)."""
    r = heatmaps.float()
    pos = positive_part(r.sum(1) if r.dim() == spatial + 2 else r)
    total = pos.flatten(1).sum(1).clamp_min(1e-30)
    return pos / total.view(-1, *[1] * spatial)


def border_mask(size: tuple[int, ...]) -> torch.Tensor:
    """(*size) bool: the positions within :data:`BORDER` of a side, per dimension (a dimension of
    fewer than 16 positions has none: on smaller inputs a ring of one position would be a large
    part of the input, no longer its margin).

    Example:
        >>> border_mask((32, 32)).sum().item()   # 2 positions along each side
        240
    """
    mask = torch.zeros(tuple(size), dtype=torch.bool)
    for d, n in enumerate(size):
        width = int(n * BORDER)
        if width:
            mask.narrow(d, 0, width).fill_(True)
            mask.narrow(d, n - width, width).fill_(True)
    return mask


def relevance_regions(heatmaps: torch.Tensor, reference: torch.Tensor, area: float = 1 / 8, smooth: int = 3
                      ) -> torch.Tensor:
    """(N, *S) bool: per heatmap, the ``area`` share of positions where its relevance distribution,
    averaged over ``smooth`` positions along each dimension, most exceeds ``reference``.

    Args:
        heatmaps: (N, C, *S) or (N, *S) relevance; ``S`` is (H, W) for images, (L,) for signals.
        reference: (*S) the distribution to compare with (e.g. the median of the class).
        area: the region's share of the positions, in (0, 1].
        smooth: an odd number of positions: 3 favours a connected region (a stamp, not a few
            scattered pixels); 1 takes every position on its own, as where neighbours are unrelated
            (the features of a tabular row) or a single position may decide (a token).

    Raises:
        ValueError: for an area outside (0, 1], an even or non-positive ``smooth`` or a reference of
            another shape.

    Example:
        >>> heat = torch.zeros(2, 32, 32)
        >>> heat[:, :4, :4] = 1.0   # relevance in the top-left corner only
        >>> regions = relevance_regions(heat, reference=torch.full((32, 32), 1 / 1024), area=1 / 64)
        >>> regions.sum((1, 2)).tolist(), regions[:, :4, :4].all().item()
        ([16, 16], True)
    """
    if not 0 < area <= 1 or smooth < 1 or smooth % 2 == 0:
        raise ValueError(f"need area in (0, 1] and smooth an odd number >= 1, got area={area}, smooth={smooth}")
    spatial = reference.dim()
    if spatial not in (1, 2) or heatmaps.dim() not in (spatial + 1, spatial + 2):
        raise ValueError(f"reference must be (L,) or (H, W) and heatmaps (N, [C,] *reference.shape); got reference "
                         f"{tuple(reference.shape)}, heatmaps {tuple(heatmaps.shape)}")
    p = _distribution(heatmaps, spatial)
    if tuple(p.shape[1:]) != tuple(reference.shape):
        raise ValueError(f"reference must have shape {tuple(p.shape[1:])} like the heatmaps, "
                         f"got {tuple(reference.shape)}")
    pool = F.avg_pool2d if spatial == 2 else F.avg_pool1d
    diff = pool((p - reference.to(p))[:, None], smooth, stride=1, padding=smooth // 2, count_include_pad=False)[:, 0]
    flat = diff.flatten(1)
    k = max(1, round(area * flat.shape[1]))
    region = torch.zeros_like(flat, dtype=torch.bool)
    region.scatter_(1, flat.topk(k, dim=1).indices, True)
    return region.view(p.shape)


@dataclass
class SampleEvidence:
    """Per-sample causal evidence of N analysed samples (all classes together). Per sample, the
    fields describe its strongest component (the first confirmed one in ``params["components"]``,
    then the search's, else the one with the highest score).

    Attributes:
        classes: (N,) the class each sample is analysed for.
        component: (N,) the component (``region``, ``detail``, ``tone``, ``saturation``,
            ``shading``) the fields below describe.
        rise: (N,) mean rise of the class probability of ``pastes`` other-class samples when the
            sample's component is transferred into them (half of them where its class's check
            stopped after the first stage, see :data:`SCREEN`; the same for the fields below).
        excess: (N,) how much more the sample's component raises the class probability of its
            partners than the class's controls do: the median over partners of (with the sample's
            component - the lower quartile over the class's samples' same component); for
            the region, where that reaches the rise, at most the upper quartile over partners of
            (with the sample's region - with a class mate's content there).
        flip_rate: (N,) share of the partners the model did not give the class (probability < 0.5)
            and does with the sample's component.
        drop: (N,) fall of the sample's class probability when its region (above) is removed.
        z: (N,) ``excess`` above its class's median, in units of the spread of all samples'
            (centred) excesses of that component: the per-sample suspicion.
        separation: (N,) the separation of the confirmed group the sample belongs to, at most its
            :func:`held_out_separation` (0 if none); for a sample confirmed by what most of its
            class carries (``class_area``), the excess that group reaches over the rise asked.
        separation_ratio: (N,) per sample, its class's best-separated group (over every check)
            as a share of that check's ``min_separation`` (for a group that reaches it, the smaller of
            its separation and its :func:`held_out_separation`; at most what its concentration, its
            shared fine pattern and, for the tone, the saturation and the shading, its share of the
            samples no placed group confirms allow: ``compact``, ``shared``, :data:`WHOLE`), or the
            excess a group credibly more than half of the class reaches in its regions over the other
            classes or its border over the rise asked, where higher: >= 1 where the class has a
            confirmed group, how close it came where not; 0 when no group reaches ``min_rise``.
        confirmed: (N,) bool: in a class's top group of some component that is separated from
            the rest by at least ``min_separation`` (:func:`separated_group`), on held-out partners
            as well (:func:`held_out_separation`); or its content in its region over the other
            classes or its border carrying the class, as a group credibly more than half of the class
            does (``class_area``).
        regions: (N, *S) bool region of each sample (where its relevance exceeds its class's median;
            where it exceeds the other classes' mean, or the border, where what most of the class
            carries describes it), at the area of its strongest check (the first area for the
            global components; for a sample only the search confirms, where its members' region
            content was found in it).
        partners: (N, pastes) the other-class samples (indices into the N) transferred into, drawn
            from the class's pool of ``2 * pastes``.
        passes: (N,) model evaluations spent on each sample (:attr:`forward_passes`: all of them).
        infiller: the infiller that removed the regions.
        params: the parameters of the check.
    """

    classes: np.ndarray
    component: np.ndarray
    rise: np.ndarray
    excess: np.ndarray
    flip_rate: np.ndarray
    drop: np.ndarray
    z: np.ndarray
    separation: np.ndarray
    separation_ratio: np.ndarray
    confirmed: np.ndarray
    regions: torch.Tensor
    partners: np.ndarray
    passes: np.ndarray
    infiller: Infiller
    params: dict = field(default_factory=dict)

    @property
    def forward_passes(self) -> int:
        """Model evaluations spent on all samples."""
        return int(self.passes.sum())

    def extent(self) -> np.ndarray:
        """(N,) share of the input each sample's strongest component covers (1 for ``detail``,
        ``tone``, ``saturation`` and ``shading``, which change the whole input)."""
        size = self.regions.flatten(1).float().mean(1).numpy()
        return np.where(np.isin(self.component, ("region", "border")), size, 1.0)

    def example(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """(4, C, *S): sample ``i``, it with its region removed, its first partner, and the partner
        with the sample's strongest component transferred into it (``x`` the N analysed inputs). For
        a sample only the search confirms, its found content is pasted where it was found (the
        search measured it pasted at a member's place)."""
        keep = (~self.regions[i]).to(torch.float32)[None, None].cpu()
        j = int(self.partners[i, 0])
        xi, xj = x[i:i + 1].detach().float().cpu(), x[j:j + 1].detach().float().cpu()
        with torch.inference_mode(False), torch.no_grad():
            removed = self.infiller(xi.clone(), keep)
            pasted = transfer(str(self.component[i]), xj, xi, keep, _black(x.detach().float().cpu()))
        return torch.cat([xi, removed, xj, pasted])


@dataclass
class StrategyEvidence:
    """The evidence of one class's SpRAy strategies (K clusters, n samples), summarised per strategy.

    Attributes:
        component: (K,) the members' most common strongest component (``region``, ``detail``, ...).
        region_size: (K,) mean share of the input the members' strongest components cover.
        score_drop: (K,) mean fall of the class probability when members lose their region.
        transfer_rate: (K,) mean share of other-class samples newly given the class by a member's
            strongest component.
        score_rise: (K,) mean rise of the class probability of those samples.
        score_excess: (K,) mean excess of that rise over the class's controls.
        z: (K,) mean evidence score of the members.
        flagged: (K,) bool, the strategy made of the class's confirmed samples.
        top: (K,) the member (row of the class) with the highest evidence score.
        sample_suspicion: (n,) each sample's evidence score ``z``.
        regions: (n, *S) bool region of each sample.
        forward_passes: model evaluations spent on the class's samples.
        separation_ratio: the class's best-separated group over its check's ``min_separation``
            (>= 1: flagged; below, how close the class came).
        params: the parameters of the check.
    """

    component: np.ndarray
    region_size: np.ndarray
    score_drop: np.ndarray
    transfer_rate: np.ndarray
    score_rise: np.ndarray
    score_excess: np.ndarray
    z: np.ndarray
    flagged: np.ndarray
    top: np.ndarray
    sample_suspicion: np.ndarray
    regions: torch.Tensor
    forward_passes: int
    separation_ratio: float
    params: dict = field(default_factory=dict)

    @classmethod
    def summarise(cls, evidence: SampleEvidence, rows: np.ndarray, labels: np.ndarray, flagged: np.ndarray
                  ) -> "StrategyEvidence":
        """Per-strategy means of ``evidence`` over the class's ``rows`` clustered by ``labels``."""
        k = len(flagged)
        per = {name: np.asarray(getattr(evidence, name))[rows]
               for name in ("drop", "flip_rate", "rise", "excess", "z", "component")}
        size = evidence.extent()[rows]

        def mean(values):
            return np.array([values[labels == j].mean() if (labels == j).any() else 0.0 for j in range(k)])

        def most_common(values):
            return np.array([max(set(v), key=list(v).count) if len(v := values[labels == j]) else ""
                             for j in range(k)])

        top = np.array([np.flatnonzero(labels == j)[np.argmax(per["z"][labels == j])] if (labels == j).any() else -1
                        for j in range(k)])
        return cls(component=most_common(per["component"]), region_size=mean(size), score_drop=mean(per["drop"]),
                   transfer_rate=mean(per["flip_rate"]), score_rise=mean(per["rise"]),
                   score_excess=mean(per["excess"]), z=mean(per["z"]), flagged=np.asarray(flagged, bool), top=top,
                   sample_suspicion=per["z"], regions=evidence.regions[rows],
                   forward_passes=int(evidence.passes[rows].sum()),
                   separation_ratio=float(np.max(evidence.separation_ratio[rows], initial=0.0)),
                   params=evidence.params)

    def as_dict(self) -> dict[str, np.ndarray]:
        """The per-strategy arrays by name (for tables and files)."""
        return {name: getattr(self, name) for name in ("component", "region_size", "score_drop", "transfer_rate",
                                                        "score_rise", "score_excess", "z", "flagged", "top")}


def transfer(component: str, into: torch.Tensor, source: torch.Tensor, keep: torch.Tensor | None = None,
             low: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``into`` with one component taken from ``source`` (both (B, C, *S)).

    * ``region``: the positions where ``keep`` (B, 1, *S) is 0 come from ``source``;
    * ``border``: the positions of :func:`border_mask` come from ``source`` (or those where
      ``keep`` is 0, where given);
    * ``detail``: the fine detail (the input minus its Gaussian blur, sigma 1 position) of ``source``
      over the blur of ``into``;
    * ``tone``: ``into`` shifted so that its per-channel mean is that of ``source``;
    * ``saturation``: ``into``'s colour (each position minus its channel mean) scaled so that its
      root mean square is ``source``'s; one-channel inputs are returned as they are;
    * ``shading``: ``into``'s coarse brightness replaced by ``source``'s, as light falls on a
      scene (a vignette, uneven illumination): every channel of ``into`` above ``low`` (the
      inputs' black, a number or (1, C, 1...) per channel) multiplied by ``source``'s brightness
      over ``into``'s, each the channels' mean above ``low`` blurred over an eighth of the shorter
      side (Gaussian sigma); ``into``'s brightness counts as at least a tenth of its mean.

    Raises:
        ValueError: for an unknown component, or ``region`` without ``keep``.
    """
    if component == "border" and keep is None:
        keep = (~border_mask(into.shape[2:])).to(into)[None, None]
    if component in ("region", "border"):
        if keep is None:
            raise ValueError("transfer('region', ...) needs keep, the (B, 1, *S) mask of what stays")
        return into * keep + source * (1 - keep)
    if component == "detail":
        return gaussian_blur(into, 1.0) + source - gaussian_blur(source, 1.0)
    if component == "tone":
        dims = tuple(range(2, into.dim()))
        return into - into.mean(dims, keepdim=True) + source.mean(dims, keepdim=True)
    if component == "saturation":
        dims = tuple(range(1, into.dim()))

        def colour(t):
            c = t - t.mean(1, keepdim=True)
            return c, c.pow(2).mean(dims, keepdim=True).sqrt()

        (chroma, own), (_, target) = colour(into), colour(source)
        return into - chroma + chroma * target / own.clamp_min(1e-6)
    if component == "shading":
        sigma = max(1.0, min(into.shape[2:]) / 8)
        dims = tuple(range(2, into.dim()))

        def brightness(t):
            return gaussian_blur((t - low).mean(1, keepdim=True).clamp_min(0), sigma)
        own = brightness(into)
        return low + (into - low) * brightness(source) / own.clamp_min(0.1 * own.mean(dims, keepdim=True) + 1e-6)
    raise ValueError(f"unknown component {component!r}; valid: {COMPONENTS}")


def sample_evidence(model: torch.nn.Module, x: torch.Tensor, heatmaps: torch.Tensor, classes, *,
                    components: tuple[str, ...] = DEFAULT_COMPONENTS, infiller: str | Infiller = "blur",
                    area: float | tuple[float, ...] = AREAS, smooth: int = 3,
                    pastes: int = 8, min_separation: float | Mapping[str, float] = MIN_SEPARATION,
                    min_rise: float = MIN_RISE, control: float = CONTROL,
                    floor: float = 0.01, min_members: int = 5, max_share: float = 0.5, screen: float = SCREEN,
                    search: bool = True, class_area: float = CLASS_AREA, compact: float = COMPACT,
                    shared: float = SHARED, probabilities: torch.Tensor | None = None,
                    batch_size: int = 256,
                    seed: int = 0,
                    shard: Callable[[Callable[[torch.Tensor], torch.Tensor], int], torch.Tensor] | None = None
                    ) -> SampleEvidence:
    """Paired transfer evidence for every analysed sample (see the module docstring).

    Args:
        model: the classifier (logits out); evaluated under the model guard, on its device.
        x: (N, C, *S) the analysed inputs (images (N, C, H, W) or signals (N, C, L)), at least
            two classes, at least two samples per class.
        heatmaps: (N, C, *S) or (N, *S) their relevance for their class.
        classes: (N,) the class (output index) each sample is analysed for.
        components: what is transferred: any of ``region``, ``detail``, ``tone``, ``saturation``,
            ``shading``, ``border`` (:func:`transfer`), in order of preference: a sample confirmed by several
            is described by the first (a stamp is shown as a region even when its fine detail also transfers).
            ``saturation`` is measured on RGB inputs with colour only and skipped on others, the
            ``border`` on inputs with a side of 16 or more positions only.
            Default :data:`DEFAULT_COMPONENTS` (all but ``tone`` and ``shading``).
        infiller: how a region is removed for ``drop``: a name (``blur``, ``constant``, ``noise``,
            ``gan``) or an :class:`~xai_callbacks.infill.Infiller` instance (e.g. a trained GAN).
        area: each region's share of the input, in (0, 1], or several shares, each checked as a
            region of its own (default :data:`AREAS`: an eighth and a thirty-second).
        smooth: positions the relevance is averaged over before a region is chosen
            (:func:`relevance_regions`): 3 for images and signals, 1 for tabular rows and token ids.
        pastes: other-class samples each component of each sample is transferred into, a seeded
            draw from the class's pool of ``2 * pastes`` (samples the model does not give the
            class; all of the pool where a class's check comes near its threshold, :data:`RECHECK`);
            the class's other samples transferred into the same partner are the controls.
        min_separation: separation (:func:`separated_group`) at or above which a class's top
            group of one component is confirmed, on all partners and on held-out ones
            (:func:`held_out_separation`): one number for every component, or one per
            component (default :data:`MIN_SEPARATION`: 4 for the region and the border, 3 for the
            detail, 10 for the tone, the saturation and the shading).
        min_rise: excess (probability units) every confirmed sample reaches; for a region of share
            ``a`` it is scaled by ``sqrt(8 a)`` (the same for an eighth, half for a thirty-second).
        control: the quantile of what the class's samples that went into a partner give it with
            their same component that is the partner's control, in (0, 1) (default :data:`CONTROL`,
            the lower quartile).
        floor: added to the spreads (probability units), so that a model whose transfers move
            nothing does not turn tiny differences into large scores.
        min_members: the smallest confirmed group: a strategy, not a few odd samples (5 is 10 % of
            50 analysed samples of a class; a few extreme samples of a graded feature, such as
            the darkest crops of a photo, can stand apart from their class as well).
        max_share: the share of its class a confirmed group is not credibly above (a class's
            majority strategy is what the class is): the lower quartile of the group's share given
            the class's analysed samples must be below it, and where its upper quartile is not, the
            group must stand apart :data:`MAJORITY_SEPARATION` times as far (:func:`group_sizes`); a group
            of the tone, the saturation or the shading is not credibly above it among the samples of
            its class that no region or border group confirms either (:data:`WHOLE`).
        screen: the stage-one separation, as a share of ``min_separation``, at which a class's check
            is measured with the rest of its pastes (see :data:`SCREEN`); 0 measures every check of
            every class with all ``pastes``.
        search: in a class with a confirmed region group, look for the members' region content in
            every sample of the class, wherever it sits, and confirm the samples whose found content
            transfers as the members' does (:func:`_search`; ``pastes`` more passes per sample of
            such a class).
        class_area: the share of the input of a sample's region over the other classes, for what
            most of a class carries, which the comparison with class mates cancels
            (:func:`_whole_class`): each sample's content in that region (where its relevance most
            exceeds the other classes' mean) and, with the ``border`` component, in its border,
            transferred into its partners against other-class content there; a class is confirmed
            where a group of its samples credibly more than half of it reaches the rise asked: of a
            region of that share times :data:`OVER_OTHERS_RISE` there, ``min_rise`` in the
            border (:data:`CLASS_AREA`; 0: not checked).
        compact: how concentrated the evidence of a group found through a region larger than the
            smallest of ``area`` must be: the most relevant half of its members' regions transfers at
            least ``compact / 2`` times what the whole regions do (:data:`COMPACT`, 1: as much per unit
            of area); 0: not asked.
        shared: how much more than its class mates a group confirmed by its ``detail``, its ``region``
            or its ``border`` must share one fine pattern (within the members' regions, or the border): its
            :func:`shared_detail` against them at least ``shared`` (:data:`SHARED`; against the other
            analysed samples where the class has fewer than 2 others); for what most of a class carries
            (``class_area``), against the other classes' samples; 0: not asked.
        probabilities: (N, classes) the model's softmax of ``x`` where already computed (the
            callback has it from explaining): spares the first N forward passes.
        batch_size: inputs per forward pass.
        seed: seeds the draw of partners and class mates.
        shard: how the scores of ``n`` perturbed inputs are spread over processes:
            ``shard(fn, n)`` returns ``fn(idx)`` for ``idx = range(n)`` (LongTensor on the model's
            device), ``fn`` treating its inputs independently; ``SpRAyCallback`` splits them
            across DDP ranks and gathers them (every rank calls this function alike). None: all
            in this process.

    Raises:
        ValueError: for mismatched shapes, fewer than two classes, a class with one sample, or bad
            parameters.

    Example:
        >>> ev = sample_evidence(model, x, heatmaps, y.numpy())
        >>> ev.confirmed.shape == ev.excess.shape == (len(x),)
        True
    """
    classes = np.asarray(classes).reshape(-1)
    if x.dim() not in (3, 4) or len(x) != len(classes) or len(heatmaps) != len(x):
        raise ValueError(f"x must be (N, C, H, W) or (N, C, L) with one heatmap and one class per sample; got x "
                         f"{tuple(x.shape)}, heatmaps {tuple(heatmaps.shape)}, classes {classes.shape}")
    values, counts = np.unique(classes, return_counts=True)
    if len(values) < 2 or counts.min() < 2:
        raise ValueError("sample_evidence needs at least two classes of at least two samples each (components are "
                         "transferred into other classes' samples, against the same class's others); got "
                         f"class counts {dict(zip(values.tolist(), counts.tolist()))}")
    components = tuple(components)
    if not components or set(components) - set(COMPONENTS):
        raise ValueError(f"components must be a non-empty subset of {COMPONENTS}, got {components}")
    unusable = {}   # components these inputs do not have, skipped: why, for the error where none is left
    if x.shape[1] != 3 or (x - x.mean(1, keepdim=True)).abs().max() < 1e-6:
        unusable["saturation"] = (f"the saturation needs RGB inputs (3 channels) with colour, got {x.shape[1]} "
                                  "channel(s)")
    if not border_mask(x.shape[2:]).any():
        unusable["border"] = (f"the border needs a side of at least 16 positions, got inputs of size "
                              f"{tuple(x.shape[2:])}")
    usable = tuple(c for c in components if c not in unusable)
    if not usable:
        raise ValueError(f"{'; '.join(unusable[c] for c in dict.fromkeys(components))}; add another component of "
                         f"{COMPONENTS}")
    components = usable
    areas = (area,) if np.isscalar(area) else tuple(area)
    if not areas or not all(0 < a <= 1 for a in areas) or floor <= 0 or not 0 <= class_area <= 1:
        raise ValueError(f"need every area in (0, 1], class_area in [0, 1] and floor > 0; got area={area}, "
                         f"class_area={class_area}, floor={floor}")
    areas = tuple(float(a) for a in areas)
    # what is measured: the region once per area, the border as a region after them, then the other components
    checks = [(c, j) for c in components
              for j in (range(len(areas)) if c == "region" else (len(areas),) if c == "border" else (None,))]
    separation_of = (dict(min_separation) if isinstance(min_separation, Mapping)
                     else dict.fromkeys(COMPONENTS, float(min_separation)))
    if set(components) - set(separation_of):
        raise ValueError(f"min_separation needs a value for every component {components}, got {min_separation}")
    if smooth < 1 or smooth % 2 == 0:
        raise ValueError(f"smooth must be an odd number >= 1, got {smooth}")
    if compact < 0 or not 0 <= shared < 1:
        raise ValueError(f"compact must be >= 0 and shared in [0, 1) (0: not asked), got {compact} and {shared}")
    if pastes < 1 or min_members < 1 or not 0 <= screen <= 1 or not 0 < max_share <= 1 or not 0 < control < 1:
        raise ValueError(f"pastes and min_members must be >= 1, screen in [0, 1], max_share in (0, 1] and control in "
                         f"(0, 1), got {pastes}, {min_members}, {screen}, {max_share}, {control}")
    small = [int(v) for v, n in zip(values, counts) if group_sizes(n, max_share)[1] < min_members]
    if small:
        need = next((n for n in range(min_members, 100 * min_members) if group_sizes(n, max_share)[1] >= min_members),
                    None)
        warnings.warn(f"sample_evidence: classes {small} have too few analysed samples ({counts.min()} at the fewest) "
                      f"for a group of {min_members} (min_members) not to be credibly more than {max_share} "
                      f"(max_share) of its class, so nothing can be confirmed there; that takes {need} samples per "
                      "class",
                      stacklevel=2)
    if probabilities is not None and (probabilities.dim() != 2 or len(probabilities) != len(x)):
        raise ValueError(f"probabilities must be (N, classes) with N = {len(x)} like x, got "
                         f"{tuple(probabilities.shape)}")
    fill = get_infiller(infiller)
    params = dict(components=components, infiller=getattr(fill, "name", type(fill).__name__), area=areas,
                  smooth=smooth, pastes=pastes, min_separation={c: separation_of[c] for c in components},
                  min_rise=min_rise, control=control, floor=floor, min_members=min_members, max_share=max_share,
                  screen=screen, search=search, class_area=class_area, compact=compact, shared=shared,
                  seed=seed)
    # a region is asked for a rise in proportion to its side (see MIN_RISE)
    rise_of = [min_rise * (np.sqrt(8 * areas[j]) if c == "region" else 1.0) for c, j in checks]

    def extend(first: np.ndarray, k: int) -> bool:   # one class's stage-one excesses of check k (see SCREEN)
        score = separated_group(first, min_members, max_share, rise_of[k] / 2, floor)[1]
        return score >= screen * separation_of[checks[k][0]]

    def near(excess: np.ndarray, per: np.ndarray, k: int) -> bool:   # one class's check on its pastes (see RECHECK)
        threshold = separation_of[checks[k][0]]
        score = _class_group(excess, per, threshold, min_members, max_share, rise_of[k], floor)[1]
        return RECHECK[0] <= score / threshold < RECHECK[1]
    module = unwrap_model(model)
    device = model_device(module)
    # on the CPU with channels-last weights; a model Lightning compiled runs as the guard gives it
    if device.type == "cpu" and not getattr(module, "_compiler_ctx", None):
        model = _ChannelsLast(module)
    target = torch.from_numpy(classes).to(device)

    def class_probability(make: Callable[[torch.Tensor], torch.Tensor], sample_of: torch.Tensor) -> torch.Tensor:
        """(n,) class probabilities of the n inputs ``make(idx)`` made from samples ``sample_of``."""
        def part(idx: torch.Tensor) -> torch.Tensor:
            return score_perturbed(model, lambda i: make(idx[i]), sample_of[idx], target, output="probability",
                                   batch_size=batch_size)
        return part(torch.arange(len(sample_of), device=device)) if shard is None else shard(part, len(sample_of))
    with torch.inference_mode(False), torch.no_grad():  # inputs may be inference tensors (Trainer.validate)
        x = x.detach().to(device, torch.float32, copy=True)   # on the model's device once, for every pass
        m = _measure(model, x, heatmaps.clone(), classes, checks, rise_of, areas, smooth, pastes, batch_size, seed,
                     extend, near, probabilities, class_probability, _black(x), control, compact)

    def concentration(k: int, members: np.ndarray) -> float:
        """What the most relevant half of the members' regions of check ``k`` raises their first ``pastes``
        partners by, over what their whole regions do (the medians over the members; see ``compact``)."""
        half = m["halves"][checks[k][1]]
        by = torch.from_numpy(np.repeat(members, pastes)).to(device)
        into = torch.from_numpy(m["partners"][members].reshape(-1)).to(device)
        keep = (~half[by]).float()[:, None]
        with torch.inference_mode(False), torch.no_grad():
            p = class_probability(lambda i: transfer("region", x[into[i]], x[by[i]], keep[i]), by)
        m["passes"][members] += pastes
        before = m["before"][torch.from_numpy(members).to(device)].cpu().numpy()
        wholes = m["transferred"][members, k] - before
        halves = np.where(np.isnan(wholes), np.nan, p.view(len(members), pastes).cpu().numpy() - before)
        return float(np.median(np.nanmean(halves, 1)) / max(np.median(np.nanmean(wholes, 1)), floor))

    def shared_pattern(members: np.ndarray, others: np.ndarray, regions: torch.Tensor | None) -> float:
        """:func:`shared_detail` of the samples ``members`` against ``others`` (indices), within the members'
        ``regions`` ((N, *S) bool; None: everywhere)."""
        where = None if regions is None else regions[torch.from_numpy(members).to(regions.device)].to(device)
        return shared_detail(*(x[torch.from_numpy(r).to(device)] for r in (members, others)), where=where)

    def decide(excess: np.ndarray, per: np.ndarray, component: str, rise: np.ndarray, k: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N,) z, separation and level (per class, its best group's separation over the threshold, capped by
        what else is asked: 1 or more where confirmed) of one check's excesses (N,) and per-partner excesses
        (N, pastes), asking each class the rise of its first sample (``rise`` (N,)); a group of check ``k``
        through a region larger than the smallest must be concentrated (see ``compact``), a group of the
        region, the fine detail or the border share one fine pattern (``shared``)."""
        centred, separation, level = excess.copy(), np.zeros_like(excess), np.zeros_like(excess)
        for c in values:
            centred[classes == c] -= np.median(centred[classes == c])
        for c in values:
            rows = np.flatnonzero(classes == c)
            group, score = _class_group(excess[rows], per[rows], separation_of[component], min_members, max_share,
                                        rise[rows[0]], floor)
            level_c = score / separation_of[component]
            if level_c >= 1 and k is not None and checks[k][1] in m["halves"]:
                level_c = min(level_c, concentration(k, rows[group]) / (compact / 2))
            # against the class mates (the other analysed samples where the class has fewer than 2 others), in
            # the members' regions; the search (k None) adds to a class already confirmed: not asked
            if level_c >= 1 and shared and k is not None and component in ("detail", "region", "border"):
                mates = np.setdiff1d(rows, rows[group])
                mates = mates if len(mates) >= 2 else np.setdiff1d(np.arange(len(classes)), rows[group])
                where = None if component == "detail" else m["regions"][checks[k][1]]
                level_c = min(level_c, shared_pattern(rows[group], mates, where) / shared)
            level[rows] = level_c
            if level_c >= 1:
                separation[rows[group]] = score
        return centred / (_spread(centred) + floor), separation, level
    z, separation, level = (np.stack(d, 1) for d in zip(*(decide(m["excess"][:, k], m["per"][:, k], c,
                                                                 np.full(len(classes), rise_of[k]), k)
                                                          for k, (c, _) in enumerate(checks))))
    # a group of a change of the whole input, among the samples of its class that no placed check confirms
    # (see WHOLE)
    placed = np.array([c in ("region", "border") for c, _ in checks])
    for k in (k for k, (c, _) in enumerate(checks) if c in WHOLE):
        for c in values:
            rows = np.flatnonzero(classes == c)
            members = separation[rows, k] > 0
            carriers = (separation[rows][:, placed] > 0).any(1) & ~members
            most = group_sizes(len(rows) - int(carriers.sum()), max_share)[1]
            if members.sum() > most:
                separation[rows, k] = 0
                level[rows, k] = min(level[rows[0], k], most / members.sum())
    ratio = level.max(1)
    layer = [0 if j is None else j for _, j in checks]   # per check its regions in m["regions"]

    def add_check(component: str, found: dict, regions: torch.Tensor, z_k: np.ndarray, sep_k: np.ndarray):
        """A check measured after the others (the search, what most of a class carries) as one more column."""
        nonlocal z, separation
        checks.append((component, None))
        layer.append(len(m["regions"]))
        z, separation = np.column_stack([z, z_k]), np.column_stack([separation, sep_k])
        for key in ("rise", "excess", "flip"):
            m[key] = np.column_stack([m[key], found[key]])
        m["regions"] = torch.cat([m["regions"], regions.cpu()[None]])
        m["passes"] = m["passes"] + found["passes"]

    found = [k for k, (c, _) in enumerate(checks) if c == "region" and separation[:, k].any()] if search else []
    if found:   # the members' region content, wherever a sample of their class holds it
        with torch.inference_mode(False), torch.no_grad():
            f = _search(x, m, classes, [(separation[:, k] > 0, checks[k][1]) for k in found], class_probability,
                        control)
        rise = np.array([rise_of[k] for k in found])   # each class asked its members' area's rise
        z_f, sep_f, level_f = decide(f["excess"], f["per"], "region", rise[f["group"]])
        ratio = np.maximum(ratio, level_f)
        for c in values:   # a group that is not mostly the members' is something else
            members = f["members"] & (classes == c)
            if not members.any() or 2 * (sep_f[members] > 0).sum() < members.sum():
                sep_f[classes == c] = 0
        z_f[sep_f == 0] = -np.inf   # describes only the samples it confirms
        add_check("region", f, f["regions"], z_f, sep_f)
    places = []   # what most of a class carries: in each sample's region over the other classes, in the border
    if class_area and "region" in components:
        places.append(("region", _over_other_classes(heatmaps.to(device), classes, class_area, smooth, x.dim() - 2),
                       min_rise * np.sqrt(8 * class_area) * OVER_OTHERS_RISE))
    if class_area and "border" in components:
        places.append(("border", border_mask(x.shape[2:]).to(device).expand(len(x), *x.shape[2:]), min_rise))
    for component, regions, rise in places:
        with torch.inference_mode(False), torch.no_grad():
            w = _whole_class(x, regions, m, classes, rise, max_share, CLASS_SCREEN if screen else pastes,
                             seed, class_probability)
        for c in values if shared else ():   # what most of a class carries, against the other classes' samples
            rows = np.flatnonzero(classes == c)
            if w["ratio"][rows[0]] >= 1:
                share = shared_pattern(rows[w["confirmed"][rows]], np.flatnonzero(classes != c), regions)
                w["ratio"][rows] = min(w["ratio"][rows[0]], share / shared)
                w["confirmed"][rows] &= share >= shared
        spread = _spread(w["excess"][np.isfinite(w["excess"])])
        add_check(component, w, regions, np.where(w["confirmed"], w["excess"] / (spread + floor), -np.inf),
                  np.where(w["confirmed"], w["ratio"], 0.0))
        ratio = np.maximum(ratio, w["ratio"])
    excess = m["excess"]
    confirmed = separation > 0
    best = np.where(confirmed.any(1), confirmed.argmax(1), z.argmax(1))   # the first confirmed check
    rows = np.arange(len(classes))
    # the region (and its removal) of the best check's area; the first area for the global components
    regions = m["regions"][np.array(layer)[best], rows]
    with torch.inference_mode(False), torch.no_grad():
        keep = (~regions).float()[:, None].to(device)
        removed = class_probability(lambda i: fill(x[i], keep[i]), torch.arange(len(x), device=device)).cpu().numpy()
    return SampleEvidence(classes=classes, component=np.array([c for c, _ in checks])[best],
                          rise=m["rise"][rows, best], excess=excess[rows, best], flip_rate=m["flip"][rows, best],
                          drop=m["own"] - removed, z=z[rows, best], separation=separation[rows, best],
                          separation_ratio=ratio, confirmed=confirmed.any(1), regions=regions,
                          partners=m["partners"], passes=m["passes"] + 1, infiller=fill,
                          params=params)


class _ChannelsLast(torch.nn.Module):
    """``model`` called with channels-last copies of its 4-D weights; the model itself is not
    touched. On the CPU the check's images go in channels-last already
    (:func:`~xai_callbacks.scoring.score_perturbed`); with the weights so as well the forward pass
    at 32 pixels ran 1.4x faster for ResNet-18 and 2.7-2.8x for MobileNetV3-small and
    EfficientNet-B0, about as fast for the other models of ``benchmarks/layout.py`` and at 64
    pixels (two cores, 2026-12-05). The copies are made with ``Tensor.to(memory_format=...)``:
    ``contiguous(memory_format=...)`` leaves a kernel with a dimension of one (a 1x1 or a depthwise
    convolution's) in strides the convolution takes for the contiguous layout, which left those two
    models as slow as before. A model that cannot be called so is called as it is."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        with torch.inference_mode(False):   # the copies are used outside inference mode
            self.weights = {name: p.detach().to(memory_format=torch.channels_last)
                            for name, p in model.named_parameters() if p.dim() == 4}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weights:
            try:
                return torch.func.functional_call(self.model, self.weights, (x,))
            except RuntimeError:
                self.weights = {}
        return self.model(x)


def shared_detail(members: torch.Tensor, others: torch.Tensor, where: torch.Tensor | None = None) -> float:
    """How much more the samples ``members`` (m >= 2, C, *S) share one fine pattern, wherever it lies in
    each, than ``others`` (>= 2 samples: the members' class mates, or the other classes' samples)
    share among themselves. A sample's fine detail is its input less its Gaussian blur (sigma 1
    position, the ``detail`` of :func:`transfer`), less its mean, to unit length; with ``where``
    ((m, *S) bool: each member's region) only within the member's region, and within the members'
    regions in turn for ``others``.
    Two samples share it by the largest cross-correlation of their fine details over every circular
    shift (their cosine where the pattern lies at one place in both); a set by the median over its
    samples of the median over the others.

    Example:
        >>> i = torch.arange(16)
        >>> board = 0.3 * ((i[:, None] + i) % 2 * (i[:, None] % 4 < 2) * (i < 8))  # a patch of fine pattern
        >>> smooth = gaussian_blur(torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(0)), 2.0)
        >>> anywhere = torch.stack([torch.roll(board, (3 * k, 5 * k), (0, 1)) for k in range(6)])[:, None]
        >>> shared_detail(smooth[:6] + anywhere, smooth[6:]) > 0.5, abs(shared_detail(smooth[:6], smooth[6:])) < 0.1
        (True, True)
        >>> abs(shared_detail(smooth[:6] + anywhere, smooth[6:] + anywhere.flip(0))) < 0.1  # as the class's own texture
        True
        >>> where = torch.stack([torch.roll((i < 8).expand(16, 16), (3 * k, 5 * k), (0, 1)) for k in range(6)])
        >>> shared_detail(smooth[:6] + anywhere, smooth[6:], where=where) > 0.5  # within each patch's half
        True
    """
    if where is None:
        return _shift_share(members) - _shift_share(others)
    in_turn = where[torch.arange(len(others), device=where.device) % len(where)]
    return _shift_share(members, where) - _shift_share(others, in_turn)


def _shift_share(x: torch.Tensor, where: torch.Tensor | None = None) -> float:
    """The median over the samples ``x`` (m >= 2, C, *S; (m, F) rows; at most 64 of them, evenly spaced,
    are compared) of the median over the others of the largest circular cross-correlation of their
    unit fine details, each within its region ``where`` ((m, *S) bool) where given (see
    :func:`shared_detail`)."""
    x = x[:, None] if x.dim() == 2 else x
    inside = torch.ones_like(x[:, :1]) if where is None else where.view(len(x), 1, *x.shape[2:])
    pick = torch.linspace(0, len(x) - 1, min(len(x), 64), device=x.device).round().long()
    x = x[pick].float()
    inside = inside[pick].expand_as(x).float()
    d = (x - gaussian_blur(x, 1.0)) * inside
    mean = d.flatten(1).sum(1).div(inside.flatten(1).sum(1).clamp_min(1))   # within the region
    d = ((d - mean.view(-1, *[1] * (x.dim() - 1))) * inside).flatten(1)
    f = torch.fft.rfftn((d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(x), dim=tuple(range(2, x.dim())))
    # sample i against all: the cross-correlation over every shift, its channels summed (in frequency: fewer inverses)
    positions = tuple(range(1, x.dim() - 1))
    best = torch.stack([torch.fft.irfftn((f[i:i + 1] * f.conj()).sum(1), s=x.shape[2:], dim=positions).flatten(1)
                        .amax(1) for i in range(len(x))])
    others = best[~torch.eye(len(x), dtype=torch.bool, device=x.device)].view(len(x), len(x) - 1)
    return float(_median(_median(others, 1), 0))


def _black(x: torch.Tensor) -> torch.Tensor:
    """(1, C, 1...): the per-channel minimum of the analysed inputs ``x`` (N, C, *S), the black the
    ``shading`` transfer scales above."""
    return x.amin(dim=(0, *range(2, x.dim())), keepdim=True)


def _median(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t.median(dim).values`` (the lower of the two middle values) by sorting: ``torch.median``
    along a dimension has no deterministic CUDA kernel (``Trainer(deterministic=True)`` on a GPU)."""
    return t.sort(dim).values.select(dim, (t.shape[dim] - 1) // 2)


def _spread(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation: the standard deviation of normal values, robustly."""
    return float(1.4826 * np.median(np.abs(values - np.median(values)))) if len(values) else 0.0


def group_sizes(n: int, max_share: float = 0.5) -> tuple[int, int]:
    """The largest groups of ``n`` analysed samples that are credibly less than ``max_share`` of
    their class and that are not credibly more: the upper and the lower quartile of the share
    (the one-sided 75 % Wilson bounds of ``m / n``, :data:`SHARE_Z`) below ``max_share``. With
    ``max_share`` 0.5: 22 and 27 of 50, 15 and 19 of 35, 10 and 14 of 25; below 9 samples no group of 5.

    Example:
        >>> group_sizes(50), group_sizes(25)
        ((22, 27), (10, 14))
    """
    m, size = np.arange(n + 1), max(n, 1)
    p, z2 = m / size, SHARE_Z ** 2 / size
    centre = (p + z2 / 2) / (1 + z2)
    half = SHARE_Z * np.sqrt(p * (1 - p) / size + z2 / (4 * size)) / (1 + z2)
    return int(m[centre + half < max_share].max(initial=0)), int(m[centre - half < max_share].max(initial=0))


def separated_group(excess: np.ndarray, min_members: int = 5, max_share: float = 0.5, min_rise: float = MIN_RISE,
                    floor: float = 0.01) -> tuple[np.ndarray, float]:
    """The top group of one class's excesses that is best separated from the rest.

    Over the group sizes ``m`` from ``min_members`` up to the largest group not credibly more than
    ``max_share`` of the class (:func:`group_sizes`) whose smallest member is at least
    ``min_rise``, the separation is the gap between the group's smallest excess and the rest's
    largest, in units of the rest's spread (1.4826 MAD) plus ``floor``; divided by
    :data:`MAJORITY_SEPARATION` for a group that is not credibly less than ``max_share``.

    Returns:
        (the group's positions in ``excess``, its separation); an empty group and 0 when no size
        qualifies.

    Example:
        >>> separated_group(np.array([0.6, 0.55, 0.5, 0.02, 0.0, 0.01, -0.01, 0.03]), min_members=3)
        (array([0, 1, 2]), 18.9...)
    """
    order = np.argsort(-excess, kind="stable")
    v = excess[order]
    best, size = 0.0, 0
    minority, most = group_sizes(len(v), max_share)
    for m in range(min_members, most + 1):
        if v[m - 1] < min_rise:
            break
        score = (v[m - 1] - v[m]) / (_spread(v[m:]) + floor) / (1.0 if m <= minority else MAJORITY_SEPARATION)
        if score > best:
            best, size = float(score), m
    return np.sort(order[:size]), best


def held_out_separation(per_partner: np.ndarray, min_members: int = 5, max_share: float = 0.5,
                        min_rise: float = MIN_RISE, floor: float = 0.01) -> float:
    """How far one class's top group stands apart on partners it was not chosen on.

    ``per_partner`` (n, pastes) holds each sample's excess per partner. The partners are split in
    halves; the group is chosen on one half's excesses (each sample's median over those partners,
    :func:`separated_group`) and measured on the other's: the lower quartile of its members'
    excesses above the rest's upper quartile, in units of the rest's spread plus ``floor``. The
    better of the two directions is returned; a direction where no group qualifies counts as
    ``-inf``, and with one partner (no halves) the result is ``inf`` (nothing to hold out).

    The top of a graded tail (the crops of a class's own photo whose border transfers a little more
    than the rest) stands apart where one draw of partners happens to leave a gap; chosen anew on
    half of them, it falls back into its class on the other half. A planted shortcut is the same
    thing in every member and stands apart on either half. Quartiles, so that no single sample on
    either side of the gap decides (a group of 24 chosen where 25 carry the shortcut).

    Example:
        >>> per = np.concatenate([np.full((6, 8), 0.6), np.zeros((20, 8))]) + 0.01 * np.arange(8)
        >>> held_out_separation(per) > 10
        True
    """
    half = per_partner.shape[1] // 2
    if half == 0:
        return float("inf")
    a, b = np.median(per_partner[:, :half], 1), np.median(per_partner[:, half:], 1)
    best = -float("inf")
    for chosen, measured in ((a, b), (b, a)):
        group = separated_group(chosen, min_members, max_share, min_rise, floor)[0]
        if len(group):
            rest = np.delete(measured, group)
            gap = np.quantile(measured[group], 0.25) - np.quantile(rest, 0.75)
            best = max(best, float(gap / (_spread(rest) + floor)))
    return best


def _class_group(excess: np.ndarray, per: np.ndarray, threshold: float, min_members: int, max_share: float,
                 rise: float, floor: float) -> tuple[np.ndarray, float]:
    """One class's top group of one check and its separation (:func:`separated_group`); where that
    reaches ``threshold``, no more than on held-out partners (:func:`held_out_separation`, over the
    partners measured: the columns of ``per`` (n, partners) not all NaN)."""
    group, score = separated_group(excess, min_members, max_share, rise, floor)
    if score >= threshold:   # a group must stand apart on partners it was not chosen on too
        measured = ~np.isnan(per).all(0)
        score = min(score, held_out_separation(per[:, measured], min_members, max_share, rise, floor))
    return group, score


def _measure(model, x, heatmaps, classes, checks, rise_of, areas, smooth, pastes, batch_size, seed, extend,
             near, probs, class_probability, low, control, compact) -> dict:
    device = x.device   # sample_evidence put x on the model's device
    heatmaps = heatmaps.detach().to(device, torch.float32)
    spatial = x.dim() - 2
    n = len(x)
    border = any(c == "border" for c, _ in checks)
    regions = torch.zeros(len(areas) + border, n, *x.shape[2:], dtype=torch.bool, device=device)   # per area, border
    if border:
        regions[len(areas)] = border_mask(x.shape[2:]).to(device)
    # per region area but the smallest, each sample's most relevant half of its region (see compact; on the
    # model's device, where the concentration pastes it)
    halves = {j: torch.zeros(n, *x.shape[2:], dtype=torch.bool, device=device)
              for j, area in enumerate(areas) if compact and area > min(areas)}
    wide = 2 * pastes   # the first pastes partners of each sample, then the rest of its class's pool (see RECHECK)
    partners = np.zeros((n, wide), dtype=np.int64)   # into the N samples; the same pool for a whole class
    mates = np.zeros((n, wide), dtype=np.int64)      # into the N samples
    spare = np.zeros(n, dtype=bool)                  # the class's pool holds wide partners: stage three can be measured
    stage_one = np.zeros(n, dtype=np.int64)          # partners of the first stage (see STAGE_MATES)
    rng = np.random.default_rng(seed)

    def draw(size: int, rows: int) -> np.ndarray:   # (rows, wide) positions in range(size): the first pastes
        if size >= pastes:                           # distinct if possible, the rest as far as size allows
            return np.argsort(rng.random((rows, size)), axis=1)[:, np.arange(wide) % size]
        return rng.integers(0, size, (rows, pastes))[:, np.arange(wide) % pastes]

    passes = np.zeros(n, dtype=np.int64)   # per sample
    if probs is None:   # every class's probability of every sample
        with model_guard(model) as module, torch.no_grad():
            probs = torch.cat([class_probabilities(class_scores(module(part))) for part in x.split(batch_size)])
        passes += 1
    check_class_target(probs, torch.from_numpy(classes).to(probs.device))
    probs = probs.detach().float().cpu().numpy()
    members = [np.flatnonzero(classes == c) for c in np.unique(classes)]
    for rows in members:
        c = int(classes[rows[0]])
        # transfer only into samples the model does not give the class (they have room to rise);
        # the lowest-scored ones when too few are left
        others = np.flatnonzero(classes != c)
        p_c = probs[others, c]
        not_c = others[p_c < 0.5] if (p_c < 0.5).sum() >= pastes else others[np.argsort(p_c)[:pastes]]
        pool = rng.choice(not_c, min(wide, len(not_c)), replace=False)   # the class's partners
        partners[rows], spare[rows] = pool[draw(len(pool), len(rows))], len(pool) == wide
        stage_one[rows] = min(max(1, pastes // 2), max(1, pastes // 4, -(-STAGE_MATES * len(pool) // len(rows))))
        idx = torch.from_numpy(rows).to(device)
        reference = _median(_distribution(heatmaps[idx], spatial), 0)
        for j, area in enumerate(areas):
            regions[j, idx] = relevance_regions(heatmaps[idx], reference, area, smooth)
            if j in halves:   # the top half of the same ranking: a part of the region
                halves[j][idx] = relevance_regions(heatmaps[idx], reference, area / 2, smooth)
        for r in rows:   # the region's place control: per partner another sample of the class
            others_c = rows[rows != r]
            mates[r] = others_c[draw(len(others_c), 1)[0]]
    keeps = (~regions).float()[:, :, None]   # (areas, N, 1, *S)
    src = torch.arange(n, device=device).repeat_interleave(wide)     # per transfer: the sample, its partner
    dst = torch.from_numpy(partners.reshape(-1)).to(device)          # and the class mate of the place control
    mate = torch.from_numpy(mates.reshape(-1)).to(device)
    before = torch.from_numpy(probs[partners, classes[:, None]]).to(device)   # (N, wide)
    rise, flip, excess = (np.zeros((n, len(checks))) for _ in range(3))
    # per check each of the first pastes partners' class probability with the sample's component (NaN: not measured)
    transferred = np.full((n, len(checks), pastes), np.nan)
    per = np.full((n, len(checks), wide), np.nan)   # per partner, before the place control (replication)
    for k, (component, j) in enumerate(checks):
        keep = keeps[j] if j is not None else None

        def scores(by, rows, cols):   # (rows, cols): the component of sample by[t] into partner dst[t]
            at = (torch.as_tensor(rows, device=device)[:, None] * wide + cols[None]).reshape(-1)

            def make(i):
                t = at[i]
                return transfer(component, x[dst[t]], x[by[t]], None if keep is None else keep[src[t]], low)
            return class_probability(make, src[at]).view(len(rows), len(cols))

        # stage one: every sample into its first few partners (see STAGE_MATES; a quarter for WHOLE);
        # the rest only for the classes whose stage-one excesses come near a confirmed group (see SCREEN)
        used = np.full(n, max(1, pastes // 4)) if component in WHOLE else stage_one.copy()
        with_own = torch.zeros(n, wide, device=device)

        def measure(rows: np.ndarray, start: int, stop: int):   # rows into their partners start..stop
            with_own[rows, start:stop] = scores(src, rows, torch.arange(start, stop, device=device))
            passes[rows] += stop - start
        for size in np.unique(used):
            measure(np.flatnonzero(used == size), 0, int(size))
        if (used < pastes).any():
            first = _excess(with_own, used, members, partners, control)[0]
            for rows in members:
                if used[rows[0]] < pastes and extend(first[rows], k):
                    measure(rows, int(used[rows[0]]), pastes)
                    used[rows] = pastes
        # per partner a class mate's content through the sample's own region: what any sample of the
        # class has at that place (the upper quartile over partners stays high while up to three
        # quarters of the mates share the shortcut). Measured only where the excess reaches the
        # check's rise: the control only lowers an excess, and only those samples can be confirmed
        # (offline over 98 benchmark models it changed no decision and spared 95 % of its passes)
        place = torch.full((n, wide), torch.nan, device=device)   # per partner: own minus the mate's
        placed = np.zeros(n, dtype=np.int64)                        # partners with a place control

        def controlled() -> tuple[np.ndarray, np.ndarray]:   # the check's excesses, its place controls applied
            out, per_k = _excess(with_own, used, members, partners, control)
            need = np.flatnonzero(out >= rise_of[k]) if j is not None else np.zeros(0, int)
            for done, m in sorted({(placed[r], used[r]) for r in need}):
                rows = need[(placed[need] == done) & (used[need] == m)]
                if done < m:
                    cols = torch.arange(done, m, device=device)
                    place[rows, done:m] = with_own[rows, done:m] - scores(mate, rows, cols)
                    placed[rows], passes[rows] = m, passes[rows] + m - done
                out[rows] = np.minimum(out[rows], place[rows, :m].quantile(0.75, dim=1).cpu().numpy())
            return out, per_k
        excess[:, k], per[:, k] = controlled()
        # stage three: a class's check that comes near its threshold on all pastes, its place controls
        # applied, goes on into the rest of its pool and is decided on every partner (see RECHECK)
        close = [rows for rows in members if used[rows[0]] == pastes and spare[rows[0]]
                 and near(excess[rows, k], per[rows, k], k)]
        if close:
            rows = np.concatenate(close)
            measure(rows, pastes, wide)
            used[rows] = wide
            excess[:, k], per[:, k] = controlled()
        measured = torch.arange(wide, device=device)[None] < torch.from_numpy(used).to(device)[:, None]
        rise[:, k], flip[:, k] = _rise_and_flip(with_own, before, measured)
        transferred[:, k] = with_own.masked_fill(~measured, torch.nan)[:, :pastes].cpu().numpy()
    return dict(rise=rise, excess=excess, per=per, flip=flip, own=probs[np.arange(n), classes],
                before=before[:, :pastes], regions=regions.cpu(), partners=partners[:, :pastes],
                passes=passes, transferred=transferred, halves=halves)


def _search(x: torch.Tensor, m: dict, classes: np.ndarray, groups: list[tuple[np.ndarray, int]],
            class_probability: Callable, control: float) -> dict:
    """The members' region content wherever a sample of their class holds it.

    In each class with a confirmed region group (the first of ``groups``, each an (N,) confirmed
    mask and the layer of its regions in ``m["regions"]``, that has members in the class), per
    sample and partner: the shift of the sample that matches a member's region content best (least
    squares within the member's region over every circular shift, by FFT; the members in turn over
    the partners), and the sample so shifted pasted into the partner through that member's region.
    A stamp or tag the model reads more weakly where a sample has it (ResNet-18 reads the bottom
    right of a 32-pixel input weakly) transfers at the members' place as theirs does, and so does a
    stamp where a sample's relevance lies elsewhere; what the class's other samples hold is their own
    content, as the controls'. Returns the search as :func:`_measure` returns a check (``excess``,
    ``per``, ``rise``, ``flip``, ``passes``; zero outside the searched classes), ``regions`` (N, *S):
    where in each sample the content was found (for its first partner), ``members`` (N,) bool and
    ``group`` (N,), the position in ``groups`` each sample's class was searched with (0 where it was not).
    """
    n, pastes = m["partners"].shape
    device, size = x.device, tuple(x.shape[2:])
    dims = tuple(range(-len(size), 0))
    members_of, layer_of, group_of = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    pairs, shifts = [], []   # per transfer (sample, partner slot, member); its shift
    fft = functools.partial(torch.fft.rfftn, dim=dims)
    for c in np.unique(classes):
        rows = np.flatnonzero(classes == c)
        k = next((k for k, (confirmed, _) in enumerate(groups) if confirmed[rows].any()), None)
        if k is None:
            continue
        members, j = rows[groups[k][0][rows]], groups[k][1]
        members_of[members], layer_of[rows], group_of[rows] = True, j, k
        region = m["regions"][j, members].to(device, torch.float32)   # (M, *S)
        g = (np.arange(len(rows))[:, None] + np.arange(pastes)) % len(members)   # (rows, pastes) into members
        # sum_p r(p) (x_i(p - s) - x_g(p))^2 = corr(r, |x_i|^2)(s) - 2 corr(r x_g, x_i)(s) + const, per shift s
        r, rx = fft(region), fft(region[:, None] * x[members])
        for part in np.array_split(np.arange(len(rows)), max(1, len(rows) // 8)):   # 8 samples' spectra at a time
            i = rows[part]
            spectrum = (r[g[part]] * fft(x[i].pow(2).sum(1))[:, None].conj()
                        - 2 * (rx[g[part]] * fft(x[i])[:, None].conj()).sum(2))
            best = torch.fft.irfftn(spectrum, s=size, dim=dims).flatten(2).argmin(2).reshape(-1)
            shifts += torch.stack(torch.unravel_index(best, size), 1).tolist()
        pairs.append(np.stack([np.repeat(rows, pastes), np.tile(np.arange(pastes), len(rows)),
                               members[g].reshape(-1)], 1))
    pairs = np.concatenate(pairs)
    src = torch.from_numpy(pairs[:, 0]).to(device)
    into = torch.from_numpy(m["partners"][pairs[:, 0], pairs[:, 1]]).to(device)
    masks = m["regions"][torch.from_numpy(layer_of[pairs[:, 0]]), torch.from_numpy(pairs[:, 2])]   # (T, *S)

    def make(idx: torch.Tensor) -> torch.Tensor:
        keep = masks[idx.cpu()].to(device, torch.float32)[:, None]
        moved = torch.stack([x[i].roll(shifts[t], dims) for t, i in zip(idx.tolist(), src[idx].tolist())])
        return x[into[idx]] * (1 - keep) + moved * keep
    with_found = torch.zeros(n, pastes, device=device)
    with_found[pairs[:, 0], pairs[:, 1]] = class_probability(make, src)
    searched = np.isin(classes, classes[members_of])
    excess, per = _excess(with_found, np.full(n, pastes), [np.flatnonzero(classes == c)
                                                            for c in np.unique(classes[searched])], m["partners"],
                          control)
    rise, flip = _rise_and_flip(with_found, m["before"], torch.from_numpy(searched).to(device)[:, None])
    first = pairs[:, 1] == 0   # where each sample's content was found for its first partner
    regions = torch.zeros(n, *size, dtype=torch.bool)
    regions[pairs[first, 0]] = torch.stack([masks[t].roll([-d for d in shifts[t]], dims)
                                            for t in np.flatnonzero(first).tolist()])
    return dict(excess=excess, per=per, rise=rise, flip=flip, passes=np.where(searched, pastes, 0), regions=regions,
                members=members_of, group=group_of)


def _over_other_classes(heatmaps: torch.Tensor, classes: np.ndarray, area: float, smooth: int, spatial: int
                        ) -> torch.Tensor:
    """(N, *S) bool: per sample the region where its relevance distribution most exceeds the other
    classes' mean (:func:`relevance_regions`; ``spatial``: len(S)). Against its class's median (the
    region check) what most of the class carries cancels; against the other classes it does not,
    and it is found wherever it sits in each sample. One region per class (where the class's mean
    relevance most exceeds the other classes') held a stamp, a frame or a logo as well, but not a
    patch drawn anywhere, and tags at one of four corners only at the corners the class's mean
    favoured (on the benchmark's cached models with a shortcut on 70 % or all of a class,
    2026-12-06: the patch on a small CNN's class 0.07 of the rise asked with one region per class,
    2.93 with each sample's; tags confirmed in 43 of 50 samples with one, 50 with each sample's)."""
    dist = _distribution(heatmaps.detach().float(), spatial)
    regions = torch.zeros(dist.shape, dtype=torch.bool, device=dist.device)
    for c in np.unique(classes):
        own = torch.from_numpy(classes == c).to(dist.device)
        regions[own] = relevance_regions(dist[own], dist[~own].mean(0), area, smooth)
    return regions


def _whole_class(x: torch.Tensor, regions: torch.Tensor, m: dict, classes: np.ndarray, rise: float,
                 max_share: float, first: int, seed: int, class_probability: Callable) -> dict:
    """What most of a class carries: a stamp, a patch or a frame on most or all of its samples.

    The other checks compare a sample with its class mates, so what most of a class carries
    cancels there. Here each sample's content in ``regions`` (N, *S) bool (its region over the other
    classes, or the border) is pasted into its partners, against the place's control: per partner
    the content of a sample of another class drawn at random (``seed``) through the same region,
    what a sample that is not of the class has there (not another partner: the partners may share
    what keeps the model from giving them the class, such as another class's shortcut in that
    place). A sample's ``excess`` is its median over partners (NaN where not measured). The
    class's level is the excess its top group credibly more than ``max_share`` of it reaches (the
    ``group_sizes(n)[1] + 1``-th largest: 28 of 50, the complement of the groups the class mates'
    check confirms): a cue on most of the class, not a graded tail of it (the benchmark's logo on
    30 % of a class made the median sample of a ResNet-18's class transfer by 0.22-0.25, the 28th
    by 0.05-0.11, through one region per class). Stage one: every other sample of a class into the
    ``first`` of its partners (:data:`CLASS_SCREEN`); a class whose level comes to half of ``rise``
    goes on with every sample into all of them (``first`` ``pastes``: every class does). Where its
    level then reaches ``rise``, its samples that reach it are its confirmed ones. Returns
    ``excess``, ``rise``, ``flip``, ``passes``, ``confirmed`` and ``ratio`` (N,): the class's level
    over ``rise``.
    """
    n, pastes = m["partners"].shape
    device = x.device
    keep = (~regions).to(device, torch.float32)[:, None]
    partners = torch.from_numpy(m["partners"]).to(device)
    rng = np.random.default_rng(seed)
    donors = np.zeros((n, pastes), dtype=np.int64)   # per sample and partner, the place control's source
    for c in np.unique(classes):
        others = np.flatnonzero(classes != c)
        donors[classes == c] = others[rng.integers(0, len(others), ((classes == c).sum(), pastes))]
    donors = torch.from_numpy(donors).to(device)

    def scores(rows: np.ndarray, cols: torch.Tensor, control: bool = False) -> torch.Tensor:
        """(rows, cols) class probabilities: through sample i's region into its partner ``cols``,
        i's content or (``control``) its donor's."""
        i = torch.as_tensor(rows, device=device).repeat_interleave(len(cols))
        col = cols.repeat(len(rows))
        into, src = partners[i, col], (donors[i, col] if control else i)

        def make(t: torch.Tensor) -> torch.Tensor:
            return x[into[t]] * keep[i[t]] + x[src[t]] * (1 - keep[i[t]])
        return class_probability(make, i).view(len(rows), len(cols))

    first = min(first, pastes)
    every = torch.arange(pastes, device=device)
    members = [np.flatnonzero(classes == c) for c in np.unique(classes)]
    screened = np.concatenate([rows[::2] for rows in members])   # stage one: every other sample of a class
    with_own, placed = torch.zeros(n, pastes, device=device), torch.zeros(n, pastes, device=device)
    with_own[screened, :first], placed[screened, :first] = (scores(screened, every[:first], control)
                                                            for control in (False, True))
    passes, used, excess = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64), np.full(n, np.nan)
    passes[screened], used[screened] = 2 * first, first
    excess[screened] = _median(with_own[screened, :first] - placed[screened, :first], 1).cpu().numpy()
    ratio, confirmed = np.zeros(n), np.zeros(n, dtype=bool)

    def level(values: np.ndarray) -> float:   # what a group credibly more than max_share of the class reaches
        v = np.sort(values[np.isfinite(values)])[::-1]
        return float(v[min(group_sizes(len(v), max_share)[1], len(v) - 1)])
    for rows in members:
        if level(excess[rows]) >= rise / 2:   # stage two: every sample into every partner
            with_own[rows], placed[rows] = (scores(rows, every, control) for control in (False, True))
            excess[rows] = _median(with_own[rows] - placed[rows], 1).cpu().numpy()
            passes[rows] += 2 * pastes
            used[rows] = pastes
        ratio[rows] = level(excess[rows]) / rise
        if ratio[rows[0]] >= 1:   # only where it went on: the screen asks half of it
            confirmed[rows] = excess[rows] >= rise
    rise_of, flip = _rise_and_flip(with_own, m["before"], every[None] < torch.from_numpy(used).to(device)[:, None])
    return dict(excess=excess, rise=rise_of, flip=flip, passes=passes, confirmed=confirmed, ratio=ratio)


def _rise_and_flip(with_p: torch.Tensor, before: torch.Tensor, measured: torch.Tensor) -> tuple[np.ndarray, ...]:
    """(N,) mean rise of the partners' class probability (``with_p - before``, both (N, pastes)) over
    the ``measured`` ones (N, pastes) or (N, 1) bool, and the share of those the model did not give
    the class (below 0.5) that it does with the transfer; 0 for a sample with none measured."""
    measured = measured.expand_as(with_p)
    rise = ((with_p - before) * measured).sum(1) / measured.sum(1).clamp_min(1)
    eligible = (before < 0.5) & measured
    flip = (eligible & (with_p >= 0.5)).float().sum(1) / eligible.float().sum(1).clamp_min(1)
    return rise.cpu().numpy(), flip.cpu().numpy()


def _excess(with_own: torch.Tensor, used: np.ndarray, members: list[np.ndarray], partners: np.ndarray,
            control: float) -> tuple[np.ndarray, np.ndarray]:
    """Per sample and partner, its component's class probability minus the partner's control: the
    ``control`` quantile of what the class's samples that went into the same partner give it with
    their same component (:data:`CONTROL`). Returns the (N,) median over each sample's first
    ``used`` partners and the (N, pastes) differences (NaN for the partners not measured). ``used``
    is the same within a class."""
    out, per = np.zeros(len(with_own)), np.full(tuple(with_own.shape), np.nan)
    for rows in members:
        m = int(used[rows[0]])
        got, into = with_own[rows, :m], torch.from_numpy(partners[rows, :m]).to(with_own.device)
        low = torch.empty_like(got)
        for q in into.unique():
            low[into == q] = got[into == q].quantile(control)
        diff = got - low
        out[rows] = _median(diff, 1).cpu().numpy()
        per[rows, :m] = diff.cpu().numpy()
    return out, per
