"""Descriptors for prompt expansion, written for dreamtty, grouped by what they describe.

Expansion ranks them by text-embedding similarity to the prompt and appends a
seeded few of the best matches, at most ``PER_GROUP`` from one group.
"""

from __future__ import annotations

GROUPS: dict[str, tuple[str, ...]] = {
    "quality": (
        "highly detailed", "intricate details", "sharp focus", "crisp textures", "fine detail", "high resolution",
        "meticulous craftsmanship", "masterful execution", "polished finish", "professional quality",
        "award-winning", "refined composition", "clean rendering", "elegant", "striking", "beautifully balanced",
        "museum quality", "gallery piece", "exquisite", "precise", "richly textured", "carefully lit",
        "subtle gradations", "clear readable forms", "well-defined edges", "harmonious", "breathtaking",
        "immaculate detail", "vivid clarity", "thoughtful design", "pristine", "stunning",
    ),
    "lighting": (
        "soft diffused light", "golden hour glow", "dramatic rim light", "volumetric light rays", "warm backlight",
        "cool moonlight", "candlelit warmth", "neon reflections", "gentle window light", "high-key lighting",
        "low-key lighting", "chiaroscuro", "glowing highlights", "soft shadows", "deep shadows",
        "sun-dappled light", "overcast soft light", "luminous atmosphere", "studio lighting", "radiant glow",
        "twilight ambience", "firelight flicker", "bioluminescent glow", "light shafts through mist",
        "bounce light", "specular highlights", "crepuscular rays", "silhouetted against the light",
        "dappled shade", "soft morning light", "stage spotlight", "lantern glow", "aurora light",
    ),
    "color": (
        "vibrant colors", "rich saturated palette", "muted earth tones", "pastel palette", "harmonious color palette",
        "complementary colors", "monochrome palette", "warm color palette", "cool color palette",
        "teal and orange tones", "jewel tones", "soft desaturated colors", "deep blues", "golden tones",
        "crimson accents", "emerald hues", "iridescent sheen", "subtle color grading", "high contrast colors",
        "faded vintage colors", "luminous color", "sepia tones", "black and white contrast", "candy colors",
        "autumnal palette", "icy blue palette", "sunset hues", "earthy greens", "rose gold tones", "duotone",
        "split toning", "neon palette",
    ),
    "composition": (
        "rule of thirds", "centered composition", "symmetrical composition", "leading lines", "dynamic angle",
        "wide establishing shot", "intimate close-up", "low angle view", "bird's eye view", "depth of field",
        "shallow depth of field", "bokeh background", "layered depth", "strong silhouette", "negative space",
        "framed by foreground elements", "sense of scale", "panoramic vista", "diagonal composition",
        "balanced framing", "foreground interest", "cinematic framing", "portrait orientation", "tight crop",
        "atmospheric perspective", "vanishing point", "over the shoulder view", "eye-level view", "aerial view",
        "golden ratio", "minimal composition",
    ),
    "mood": (
        "serene", "tranquil mood", "mysterious atmosphere", "whimsical", "melancholic", "nostalgic",
        "epic scale", "dreamlike", "ethereal", "moody", "joyful energy", "cozy atmosphere", "ominous",
        "peaceful", "majestic", "playful", "romantic", "haunting", "hopeful", "contemplative", "surreal",
        "enchanting", "tense atmosphere", "heroic", "quiet solitude", "magical", "otherworldly", "intimate",
    ),
    "texture": (
        "visible brushstrokes", "fine film grain", "rough canvas texture", "smooth gradients", "weathered surfaces",
        "glossy reflections", "matte finish", "soft fur texture", "delicate fabric folds", "polished metal",
        "worn leather", "rippling water", "frosted glass", "cracked paint", "mossy stone", "dewdrops",
        "flowing hair", "silky sheen", "grainy paper", "sculpted detail", "intricate patterns", "ornate filigree",
        "crystalline structure", "velvety shadows", "wet surfaces", "dusty air", "hand-crafted details", "embossed relief", "woven textile", "rusted metal",
    ),
    "photography": (
        "35mm photograph", "85mm portrait lens", "wide angle lens", "telephoto compression", "macro detail",
        "long exposure", "natural skin texture", "catchlights in the eyes", "f/1.8 aperture", "high dynamic range",
        "film photography", "editorial photography", "documentary style", "candid moment", "studio backdrop",
        "professional color grading", "lens flare", "motion blur", "tack sharp", "medium format", "natural light",
        "available light", "soft focus edges",
    ),
    "art": (
        "digital painting", "concept art", "matte painting", "oil on canvas", "watercolor washes", "ink linework",
        "painterly style", "illustrative style", "graphic shapes", "stylized", "cel shading", "storybook illustration",
        "fine art", "expressive strokes", "loose sketchy lines", "clean vector shapes", "impressionistic touches",
        "art nouveau ornament", "ukiyo-e influence", "trending artwork", "detailed background art", "key visual",
    ),
    "render": (
        "3d render", "physically based rendering", "global illumination", "ray traced reflections",
        "subsurface scattering", "ambient occlusion", "octane style render", "unreal engine style", "isometric view",
        "clay render", "soft studio render", "volumetric fog", "tilt-shift miniature", "low poly", "hyperreal render",
    ),
    "environment": (
        "misty forest", "rain-soaked streets", "snowy landscape", "desert sands", "ocean waves", "mountain peaks",
        "starry night sky", "lush vegetation", "ancient ruins", "bustling city", "quiet countryside",
        "golden fields", "underwater light", "cloudy sky", "autumn leaves", "spring blossoms", "foggy morning",
        "dramatic clouds", "distant horizon", "reflections on water", "overgrown with ivy", "sunlit meadow",
        "cozy interior", "grand hall", "futuristic skyline", "candlelit room",
    ),
    "subject": (
        "expressive face", "detailed eyes", "graceful pose", "dynamic motion", "natural pose", "elegant clothing",
        "intricate armor", "flowing robes", "detailed feathers", "glistening scales", "lifelike proportions",
        "characterful expression", "gentle smile", "determined gaze", "windswept hair", "detailed hands",
        "ornate jewelry", "textured costume", "sculpted musculature", "delicate petals", "architectural detail",
    ),
}

PER_GROUP = 2
GENERAL = "quality"  # used alone when no text encoder is at hand to rank with

DESCRIPTORS: tuple[str, ...] = tuple(d for words in GROUPS.values() for d in words)
GROUP_OF: dict[str, str] = {d: g for g, words in GROUPS.items() for d in words}
