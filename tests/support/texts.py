"""Sample documents (one paragraph each, on unrelated topics) for the test LLM server's
tests."""

BEES = (
    "Honeybees live in colonies of up to sixty thousand workers, a few hundred drones and "
    "a single queen. Workers forage for nectar and pollen within about three kilometres of "
    "the hive, and they tell nestmates where flowers are through the waggle dance, whose "
    "angle points relative to the sun and whose duration encodes distance. Nectar is turned "
    "into honey by evaporation and enzymes, then stored in wax cells that workers secrete "
    "from glands on their abdomen. In winter the colony forms a tight cluster and shivers "
    "its flight muscles to keep the queen warm. Beekeepers inspect frames for brood, "
    "disease and varroa mites, which weaken colonies and spread viruses."
)
TIDES = (
    "Ocean tides come from the gravitational pull of the moon and, to a lesser degree, the "
    "sun. Because the pull is stronger on the side of Earth facing the moon, water bulges "
    "there and on the opposite side, giving most coasts two high tides a day. When sun and "
    "moon line up at new and full moon, spring tides bring the largest range; at quarter "
    "moons the neap tides are weakest. Coastline shape matters too: the Bay of Fundy funnels "
    "water into ranges above fifteen metres, while the Mediterranean barely moves."
)
PRESS = (
    "Johannes Gutenberg combined movable metal type, an oil-based ink and a screw press "
    "adapted from wine making around 1450 in Mainz. His Bible, printed in roughly 180 "
    "copies, showed that books could be produced far faster than by scribes. Within fifty "
    "years printing shops spread to more than two hundred European towns, prices of books "
    "fell sharply, and pamphlets carried the debates of the Reformation to wide audiences."
)
