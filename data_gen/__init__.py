"""Recipes that make diff banks: hidden topic (with trigger variants), news headlines, rank variants."""

from data_gen.hidden_topic import HiddenTopicRecipe
from data_gen.news import NewsRecipe
from data_gen.recipe import Recipe, Sample

RECIPES = {"hidden_topic": HiddenTopicRecipe, "news": NewsRecipe}

__all__ = ["RECIPES", "HiddenTopicRecipe", "NewsRecipe", "Recipe", "Sample"]
