"""Example stories offered in the accordion to start from (issue 12): one per story form a user meets first.

Each is plain story text (``format``'s text form) and parses as it is; the tests hold them to that and to the
features each one shows. Style words belong in the WebUI's prompt box, so the examples carry none.
"""
from __future__ import annotations

ONE_CHARACTER = """\
// One character: who the story is about, then one frame per line.
// Text after ' # ' is a caption; [NC] marks a frame without the character.
a small red fox with a white-tipped tail | fox
waking up in a burrow under an old oak # Morning
trotting through fresh snow between birch trees
[NC] a frozen lake under a pale winter sun # Noon
watching a hare from behind a fallen log
curled up asleep beside the oak as stars come out # Night
"""

NAMED_CHARACTERS = """\
// Named characters: 'Name: description' lines, '---', then tagged frames.
// Type '[' in a frame line to pick a name; [NC]: no character.
Mira: a young woman with short silver hair, green raincoat | woman, hair, raincoat
Tomo: an elderly man with a grey beard and round glasses, brown cardigan | man, beard, glasses, cardigan
Pip: a small orange robot with one round blue eye | robot, eye
---
[Mira] finds a broken robot in an alley # The find
[Mira] [Pip] carries the robot home through the rain
[Tomo] opens his repair shop door, surprised
[Tomo] [Pip] solders a wire under a desk lamp # Repairs
[NC] a workbench covered in tiny gears at night
[Pip] blinks its blue eye awake for the first time # Awake
[Mira] [Tomo] [Pip] have breakfast together # Friends
"""

LONG_STORY = """\
// 16 frames: too long for one prompt, so 1Prompt1Story gives each frame
// a window. With 'Frames per batch' at 4 and StoryDiffusion or StorySync,
// the first batch writes the reference bank the later batches read.
Ada: a lighthouse keeper, a woman in a yellow oilskin coat and a knitted blue hat | woman, coat, hat
Bolt: a scruffy black-and-white sheepdog | sheepdog
---
[Ada] climbs the spiral stairs of the lighthouse at dawn # Dawn
[Ada] polishes the great lens
[Bolt] sleeps in a basket by the stove
[Ada] [Bolt] walk along the cliff path
[NC] storm clouds gather over a grey sea # The storm
[Ada] lights the lamp as the wind rises
[Bolt] barks at the crashing waves
[NC] a small fishing boat tossed by the waves
[Ada] signals with a lantern from the gallery
[Ada] [Bolt] run down to the harbour
[Ada] rows a dinghy through the swell # The rescue
[Bolt] swims beside the dinghy
[Ada] pulls a fisherman aboard
[NC] the storm breaks and the sun comes out
[Ada] [Bolt] are thanked by the villagers # Home
[Ada] [Bolt] watch the sunset from the lighthouse
"""

EXAMPLES: dict[str, str] = {
    "One character (shorthand)": ONE_CHARACTER,
    "Three characters with [NC] frames": NAMED_CHARACTERS,
    "Long story (16 frames)": LONG_STORY,
}
